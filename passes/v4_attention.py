"""DeepSeek V4 compressed attention: ``dsgraph::attention`` over [local keys; pooled keys] ->
``dsgraph::sparse_attention`` over one index list per query.

Eager V4 concatenates the pooled (compressed) keys after the local ones (``kv = cat([kv, pooled], 1)``,
T = L + P) and masks the scores with ``cat([band, pooled_mask], -1)``: the sliding-window band over
the local keys, and over the pooled keys the compressed causal threshold (pooled key p is visible to
query i iff ``p < (i + 1) // r``), on ratio-4 layers plus the indexer's top-k scatter. The attention
pass keeps that mask as a dense [B, 1, S, L + P] bias. This pass gives each query the list

    window: i + d for lower <= d <= upper (-1 outside [0, L))  ∪  pooled: L + p for each selected p
    (the top-k indices, or every p < P without an indexer; -1 where p is not visible)

built by a few aten ops in the graph (O(S x (W + K)) memory, never O(S x T)) and runs ONE gathering
kernel with the sink, in latent (MQA) mode when keys and values are one tensor (K = V, d_v = D).

How the masks are recognised: the band from ``dsgraph::band_mask`` or, when the whole mask was a
constant (a ratio-128 layer: no top-k, so the masks pass evaluated the concatenation and found no band),
by evaluating the local part and classifying it as the masks pass does; the threshold by evaluating its
constant [S, P] and checking it equals ``p < (i + 1) // r`` exactly, with r read off the first row that
sees a pooled key (row-chunked, under the masks pass's size limit). The top-k indices must come from
``torch.topk`` / ``dsgraph::indexer_topk`` (distinct per row: a gather counts a repeat twice).

Constraints (a site with a [local band; pooled] bias outside them is left alone, the report says why):
a finite window (both band bounds; a causal band counts as a window of S up to ``SHORT_ROWS``
queries); additive masks of 0 / -inf (or a large negative); a bias shared by the heads; no band or
top-k folded into the op itself; the op's lse unused.

Policy: every such site is rewritten (O(S x (W + K)) against the dense O(S x (L + P))). Ratio-128
layers (no indexer) gather all W + P keys per query, about half of the pooled ones invalid (-1)
under the threshold: every query reads the same staircase of pooled keys, which a dense tile over
them (a query block sharing each loaded key) would serve with more reuse; no such kernel exists yet.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from dsgraph.fxutil import call, evaluate, is_constant, val
from dsgraph.pipeline import Pass, PassContext

from .attention import MASK_CASTS, MASK_VIEWS
from .masks import classify, masked_value, row_chunks, too_large_to_evaluate
from .sparse_attention import (Reject, chain_start, exact_dtype_of, latent_cut, narrowed_to, same_view_bases, to_bshd,
                               topk_source)

aten = torch.ops.aten
dsgraph_ops = torch.ops.dsgraph

# A sliding window at least S long masks like plain causal (V4 prompts up to its 128-key window): up to
# this many queries the pass serves it as a window of S keys (an index list about as long as the dense
# row, but one kernel for every length); longer, it is a causal model's mask and is left alone.
SHORT_ROWS = 512


class V4AttentionPass(Pass):
    name = "v4_attention"
    needs = ("fused_attention",)
    provides = ("v4_sparse_attention",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not dsgraph_ops.attention.default:
                continue
            if node.args[4] is not None:
                parts = _local_and_pooled(node)
                if parts is None:
                    continue  # not a [local; pooled] mask: another pass's site or none
            elif _window_only(node):
                parts = (None, None)
            else:
                continue
            try:
                _rewrite(gm, node, ctx, *parts)
            except Reject as exc:
                ctx.skip(node, str(exc))


def _window_only(attn: fx.Node) -> bool:
    """A sliding-window site (V4's sliding layers) that no dense kernel but the reference serves (head
    dim 512: past the Triton and TileLang flash kernels): its window is an index list too."""
    _q, _k, _v, _sink, bias, topk, _scale, lower, upper, backend = attn.args
    return bias is None and topk is None and lower is not None and upper is not None and backend == "torch"


def _through(node):
    """Back through broadcasts, size-1 reshapes and float casts (0 and -inf keep their meaning)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and (
            node.target in MASK_VIEWS or node.target in MASK_CASTS and val(node.args[0]).dtype.is_floating_point):
        node = node.args[0]
    return node


def _local_and_pooled(attn: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """The two parts of a bias written ``cat([local mask, pooled mask], -1)``, else None."""
    bias = _through(attn.args[4])
    if bias.op != "call_function" or bias.target is not aten.cat.default:
        return None
    parts, dim = bias.args[0], bias.args[1] if len(bias.args) > 1 else 0
    if len(parts) != 2 or dim not in (-1, val(bias).dim() - 1) or val(bias).shape[-2:] != val(attn.args[4]).shape[-2:]:
        return None
    return parts[0], parts[1]


def _constant_plane(gm: fx.GraphModule, node: fx.Node, rows: int, cols: int, what: str) -> torch.Tensor:
    """The [rows, cols] value of a constant mask the same over its leading dims."""
    v = val(node)
    if tuple(v.shape[-2:]) != (rows, cols):
        raise Reject(f"the {what} {list(v.shape)} is not one [S={rows}, {cols}] plane")
    reason = too_large_to_evaluate(v)
    if reason is not None:
        raise Reject(f"the {what}: {reason}")
    flat = evaluate(gm, node).reshape(-1, rows, cols)
    if not all(torch.equal(plane, flat[0]) for plane in flat[1:]):
        raise Reject(f"the {what} differs across the batch")
    return flat[0]


def _window(gm: fx.GraphModule, local: fx.Node, rows: int, cols: int) -> tuple[int, int]:
    """(lower, upper) of the local keys' band ``lower <= j - i <= upper``."""
    src = _through(local)
    if src.op == "call_function" and src.target is dsgraph_ops.band_mask.default:
        n, m, lower, upper, dtype, fill, invert = src.args[:7]
        if dtype == torch.bool or not masked_value(fill) or (n, m) != (rows, cols):
            raise Reject(f"the local keys' band mask is {dtype} [{n}, {m}], not additive over [S={rows}, L={cols}]")
    elif is_constant(src, {}):
        plane = _constant_plane(gm, src, rows, cols, "local keys' mask")
        spec = classify(plane) if plane.is_floating_point() else None
        if spec is None:
            raise Reject("the local keys' constant mask is not an additive band lower <= j - i <= upper")
        lower, upper = spec[2:4]
    else:
        raise Reject("the local keys' mask is not a constant band")
    if lower is None and upper is not None and rows <= SHORT_ROWS:
        lower = -(rows - 1)  # a window covering every row (S <= W) reads as plain causal
    if lower is None or upper is None:
        raise Reject(f"the local keys' band {lower} <= j - i <= {upper} over {rows} rows is not a finite window: "
                     "one index list per query would be O(S)")
    return lower, upper


def threshold_ratio(plane: torch.Tensor) -> Optional[int]:
    """r if the additive [S, P] mask allows exactly ``p < (i + 1) // r`` (S + 1 when it allows
    nothing); None for an all-zero mask (no threshold); raises Reject for any other mask."""
    rows, cols = plane.shape
    if not plane.is_floating_point():
        raise Reject(f"the pooled keys' constant mask is {plane.dtype}, not additive")
    first, fills = None, set()
    for part in row_chunks(rows, cols):
        chunk = plane[part]
        fills.update(chunk[chunk != 0].unique().tolist())
        if any(not masked_value(f) for f in fills):
            raise Reject(f"the pooled keys' constant mask holds {sorted(fills)[-1]:g}: only 0 and -inf "
                         "(or a large negative) are a threshold")
        seen = (chunk == 0).any(-1).nonzero()
        if first is None and len(seen):
            first = part.start + int(seen[0])
    if not fills:
        return None
    ratio = rows + 1 if first is None else first + 1
    for part in row_chunks(rows, cols):
        expected = torch.arange(cols)[None, :] < torch.arange(part.start + 1, part.stop + 1)[:, None] // ratio
        if not torch.equal(plane[part] == 0, expected.to(plane.device)):
            raise Reject(f"the pooled keys' constant mask is not the compressed causal threshold p < (i + 1) // r "
                         f"(r = {ratio} from its first visible row)")
    return ratio


def _pooled(gm: fx.GraphModule, pooled: fx.Node, rows: int, cols: int, batch: int):
    """(top-k indices [B|1, S, K] or None, threshold ratio or None) of the pooled keys' mask: a sum of
    at most one ``dsgraph::topk_mask`` and one constant threshold."""
    terms, stack = [], [pooled]
    while stack:
        node = _through(stack.pop())
        if node.op == "call_function" and node.target is aten.add.Tensor and node.kwargs.get("alpha", 1) == 1 and \
                all(isinstance(a, fx.Node) for a in node.args[:2]) and not is_constant(node, {}):
            stack.extend(node.args[:2])
        else:
            terms.append(node)
    index, ratio, constants = None, None, 0
    for term in terms:
        if term.op == "call_function" and term.target is dsgraph_ops.topk_mask.default:
            if index is not None:
                raise Reject("two top-k masks on the pooled keys")
            index = term.args[0]
            shape = list(val(index).shape)
            if len(shape) != 3 or shape[0] not in (1, batch) or shape[1] != rows or term.args[1] != cols:
                raise Reject(f"the pooled keys' top-k mask has indices {shape} over {term.args[1]} keys, not "
                             f"[B, S={rows}, K] over P={cols}")
            if topk_source(index) is None:
                raise Reject("the pooled keys' indices are not a torch.topk / indexer_topk output: repeats cannot "
                             "be ruled out (a membership mask counts one once, a gather twice)")
        elif is_constant(term, {}):
            constants += 1
            if constants > 1:
                raise Reject("more than one constant mask on the pooled keys")
            ratio = threshold_ratio(_constant_plane(gm, term, rows, cols, "pooled keys' mask"))
        else:
            raise Reject(f"a pooled-key mask term ({term.name}) is neither a top-k mask nor a constant")
    return index, ratio


def _index_list(graph: fx.Graph, like: fx.Node, *, batch: int, rows: int, local: int, pooled: int,
                window: tuple[int, int], index: Optional[fx.Node], ratio: Optional[int], device) -> fx.Node:
    """[B, S, W + K] int64: the window's local keys, then L + the selected pooled keys; -1 = skip."""
    def c(target, *args, **kw):
        return call(graph, target, *args, like=like, **kw)

    lower, upper = window
    row = c(aten.arange.default, rows, dtype=torch.int64, device=device)
    offsets = c(aten.add.Scalar, c(aten.arange.default, upper - lower + 1, dtype=torch.int64, device=device), lower)
    win = c(aten.add.Tensor, c(aten.unsqueeze.default, row, 1), c(aten.unsqueeze.default, offsets, 0))
    # every j < 0 becomes the -1 all kernels skip (a where, not a clamp: Inductor's CUDA lowering of an
    # integer clamp of this index arithmetic failed, "The argument '-127 + ((0))' is not comparable")
    win = c(aten.where.ScalarSelf, c(aten.lt.Scalar, win, 0), -1, win)
    if upper + rows - 1 >= local:  # keys past the local ones would read pooled keys
        win = c(aten.where.ScalarOther, c(aten.lt.Scalar, win, local), win, -1)
    if not pooled:  # a window-only site
        return c(aten.expand.default, c(aten.unsqueeze.default, win, 0), [batch, rows, upper - lower + 1])
    if index is None:  # no indexer: every pooled key
        sel = c(aten.unsqueeze.default, c(aten.arange.default, pooled, dtype=torch.int64, device=device), 0)
    else:
        sel = index if val(index).dtype == torch.int64 else c(aten.to.dtype, index, torch.int64)
    if ratio is not None:
        visible = c(aten.floor_divide.Scalar, c(aten.add.Tensor, row, 1), ratio)
        keep = c(aten.lt.Tensor, sel, c(aten.unsqueeze.default, visible, 1))
        sel = c(aten.where.ScalarOther, keep, c(aten.add.Tensor, sel, local), -1)
    else:
        sel = c(aten.add.Tensor, sel, local)
    parts = []
    for part in (win, sel):
        shape = list(val(part).shape)
        part = part if len(shape) == 3 else c(aten.unsqueeze.default, part, 0)
        parts.append(c(aten.expand.default, part, [batch, rows, shape[-1]]))
    return c(aten.cat.default, parts, -1)


def _rewrite(gm: fx.GraphModule, node: fx.Node, ctx: PassContext, local_mask: fx.Node, pooled_mask: fx.Node) -> None:
    graph = gm.graph
    q4, k4, v4, sink, bias, topk, scale, lower, upper, _backend = node.args
    outs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if len(outs) != len(node.users) or 1 in outs and outs[1].users or 0 not in outs:
        raise Reject("the attention's log-sum-exp is used")
    batch, _, rows, _ = val(q4).shape
    if local_mask is None:  # a window-only site (see _window_only)
        local, pooled, window, index, ratio = val(k4).shape[2], 0, (lower, upper), None, None
    else:
        if topk is not None or lower is not None or upper is not None:
            raise Reject("a band or top-k mask folded into the attention op besides the [local; pooled] bias")
        if val(bias).shape[1] != 1:
            raise Reject(f"a per-head mask {list(val(bias).shape)} over the local and pooled keys")
        local, pooled = val(local_mask).shape[-1], val(pooled_mask).shape[-1]
        if any(s not in (1, batch) for s in val(bias).shape[:1]):
            raise Reject(f"the mask's batch dim {val(bias).shape[0]} is not B={batch}")
        window = _window(gm, local_mask, rows, local)
        index, ratio = _pooled(gm, pooled_mask, rows, pooled, batch)
        if index is None and ratio is None:
            raise Reject("the pooled keys carry no mask: nothing bounds the pooled index list but P")

    old = outs[0]
    existing = set(graph.nodes)
    with graph.inserting_before(old):
        q, k, v = (to_bshd(graph, x, old) for x in (q4, k4, v4))
        try:
            kb, vb = same_view_bases(k, v)
            cut = [kb] if kb is vb else latent_cut(k, v)
        except Reject:
            cut = None
        if cut is None and local_mask is None:
            return  # a window-only site with separate keys and values: the dense op's
        exact = {exact_dtype_of(x) for x in (q, k, v)}
        dtype = exact.pop() if exact <= {torch.bfloat16} or exact <= {torch.float16} else val(q).dtype
        q, k = narrowed_to(graph, q, dtype, old), narrowed_to(graph, k, dtype, old)
        v = None if cut is not None else narrowed_to(graph, v, dtype, old)
        d_v = val(v4).shape[-1]
        indices = _index_list(graph, old, batch=batch, rows=rows, local=local, pooled=pooled, window=window,
                              index=index, ratio=ratio, device=val(q).device)
        args = dict(q=val(q), k=val(k), v=val(v), indices=val(indices), bias=None, sink=val(sink), scale=scale,
                    d_v=d_v, upper=None)
        backend, rejected = ctx.choose("sparse_attention", old, **args)
        if backend is None:
            return
        fused = call(graph, dsgraph_ops.sparse_attention.default, q, k, v, indices, None, sink, scale, d_v, None,
                     backend, like=old)
        out = call(graph, operator.getitem, fused, 0, like=old)
        out = call(graph, aten.permute.default, out, [0, 2, 1, 3], like=old)
        if val(out).dtype != val(old).dtype:
            out = call(graph, aten.to.dtype, out, val(old).dtype, like=old)
    heads, hkv = val(q).shape[2], val(k).shape[2]
    k_pooled = pooled if index is None else val(index).shape[-1]
    selected = ("no pooled keys" if not pooled else f"all {pooled} pooled" if index is None
                else f"top-{k_pooled} of {pooled} pooled")
    detail = (f"{'latent (MQA)' if cut is not None else f'{heads}/{hkv} heads'}, H={heads} S={rows} L={local} "
              f"P={pooled} D={val(k).shape[3]} Dv={d_v}: window {window[0]} <= j - i <= {window[1]} + {selected}"
              + ("" if ratio is None else f" (p < (i + 1) // {ratio})")
              + f", {window[1] - window[0] + 1 + k_pooled} indices per query"
              + ("" if sink is None else ", sink") + f", {str(dtype).removeprefix('torch.')}")
    kv_inputs = cut if cut is not None else [chain_start(k, existing), chain_start(v, existing)]
    inputs = [chain_start(q, existing), *kv_inputs, *([sink] if sink is not None else []),
              *(topk_source(index).all_input_nodes if index is not None else [])]
    ctx.commit(gm, op="sparse_attention", old=old, new=out, inputs=inputs, backend=backend, rejected=rejected,
               detail=detail)
