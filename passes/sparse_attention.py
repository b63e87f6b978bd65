"""``dsgraph::attention`` with a top-k index mask -> ``dsgraph::sparse_attention``.

The masks pass turns ``full(-inf).scatter_(-1, idx, 0)`` into ``dsgraph::topk_mask`` and the attention
pass folds it into ``dsgraph::attention(..., topk=idx)``, whose kernels still visit all T keys of a
row and test membership (O(S x T)). This pass rewrites such sites into the gathering op (O(S x K)):

- the causal band folds into the per-index validity ``j - s <= upper``; the query/key layouts are
  moved to [B, S, H, D] / [B, T, Hkv, D] (a permute the attention pass inserted is peeled off);
- latent (MQA) mode when the values are provably the first d_v dims of the one shared key (``v`` is
  ``k[..., :d_v]``, or ``k = cat([v, k_rope], -1)`` as absorbed MLA writes it, through the same
  views and casts): the kernels then read each gathered key once for values too;
- q, k, v that are fp32 casts of bf16/fp16 tensors (DeepSeek's ``q.float()``, ``k.float()``) run in
  that half type: the products of half values are exact in the kernels' fp32 accumulators, so this
  only changes summation order (and lets the bf16 tensor-core kernels serve the site).

A head-independent bias (a padding mask, or a causal mask that reached a per-block graph as a
tensor) is gathered at the indices: [B, S, K], O(S x K).

Constraints (a site outside them is left alone, the report says why): no sink, no per-head bias,
no lower band bound (sliding window), the op's lse unused, and indices that are
provably distinct per row: the output of ``torch.topk`` or ``dsgraph::indexer_topk`` (through views
and casts). A membership mask counts a repeated index once, a gather twice.

Policy rule: every such site is rewritten. The sparse kernels do O(S·K·H) work against the dense
op's O(S·T·H) with K <= T, and no dense kernel but the chunked torch reference serves index masks
at all. (Should a dense flash kernel with index masks appear, the rule becomes K <= T / 2: a causal
dense kernel visits about T / 2 keys per row.)
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from dsgraph.fxutil import call, evaluate, is_constant, val
from dsgraph.pipeline import Pass, PassContext

aten = torch.ops.aten
dsgraph_ops = torch.ops.dsgraph

WIDENING = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.to.dtype_layout}
# What indices may pass through between the top-k and the mask (their values unchanged).
INDEX_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
               aten.contiguous.default, aten.alias.default, aten.to.dtype, aten._to_copy.default}
# Views and copies a key or value may pass through (latent detection checks the last dim stays put).
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
         aten.expand.default, aten.permute.default, aten.transpose.int, aten.clone.default,
         aten.contiguous.default, aten.alias.default}


class Reject(Exception):
    """The site carries a top-k mask but is outside what the sparse op serves; the message says why."""


class SparseAttentionPass(Pass):
    name = "sparse_attention"
    needs = ("fused_attention",)
    provides = ("sparse_attention",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is dsgraph_ops.attention.default and node.args[5] is not None:
                try:
                    _rewrite(gm, node, ctx)
                except Reject as exc:
                    ctx.skip(node, str(exc))


def topk_source(index: fx.Node) -> Optional[fx.Node]:
    """The ``aten.topk`` / ``dsgraph::indexer_topk`` node whose indices ``index`` is, else None."""
    node = index
    while node.op == "call_function" and node.target in INDEX_VIEWS and \
            val(node.args[0]).shape[-1] == val(node).shape[-1]:  # rows stay whole
        node = node.args[0]
    if node.op != "call_function" or node.target is not operator.getitem or node.args[1] != 1:
        return None
    src = node.args[0]
    if src.target is dsgraph_ops.indexer_topk.default:
        return src
    if src.target is aten.topk.default:
        dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", -1)
        return src if dim in (-1, val(src.args[0]).dim() - 1) else None
    return None


def to_bshd(graph: fx.Graph, node: fx.Node, like: fx.Node) -> fx.Node:
    """[B, H, L, D] -> [B, L, H, D], peeling the permute the attention pass inserted."""
    if node.target is aten.permute.default and list(node.args[1]) == [0, 2, 1, 3]:
        return node.args[0]
    return call(graph, aten.permute.default, node, [0, 2, 1, 3], like=like)


def exact_dtype_of(node: fx.Node) -> torch.dtype:
    """The narrowest float dtype holding ``node``'s values exactly, from the widening casts and views
    it was computed through."""
    narrowest = val(node).dtype
    while node.op == "call_function" and (node.target in VIEWS or node.target in WIDENING):
        node = node.args[0]
        dtype = val(node).dtype
        if not dtype.is_floating_point or torch.promote_types(dtype, narrowest) != narrowest:
            break
        narrowest = dtype
    return narrowest


def narrowed_to(graph: fx.Graph, node: fx.Node, dtype: torch.dtype, like: fx.Node) -> fx.Node:
    if val(node).dtype == dtype:
        return node
    if node.target in WIDENING and val(node.args[0]).dtype == dtype:
        return node.args[0]
    return call(graph, aten.to.dtype, node, dtype, like=like)


def same_view_bases(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Walk k and v down through matching views/casts that keep the last dim in place and the leading
    shape equal on both sides; returns the bases."""
    while True:
        kv_, vv_ = val(k), val(v)
        if kv_.shape[:-1] != vv_.shape[:-1] or kv_.dtype != vv_.dtype:
            raise Reject("values and keys differ outside the last dim")
        step = k.op == "call_function" and v.op == "call_function" and (
            (k.target in WIDENING and v.target in WIDENING) or (k.target is v.target and k.target in VIEWS))
        if not step:
            return k, v
        if k.target in VIEWS:
            ka, va = val(k.args[0]), val(v.args[0])
            if ka.shape[:-1] != va.shape[:-1] or ka.shape[-1] != kv_.shape[-1] or va.shape[-1] != vv_.shape[-1]:
                return k, v
            if k.target is aten.permute.default and (list(k.args[1]) != list(v.args[1]) or k.args[1][-1] % ka.dim() != ka.dim() - 1):
                return k, v
            if k.target is aten.transpose.int and (k.args[1:] != v.args[1:] or ka.dim() - 1 in [d % ka.dim() for d in k.args[1:]]):
                return k, v
            if k.target is aten.unsqueeze.default and (k.args[1] % (ka.dim() + 1) != v.args[1] % (va.dim() + 1) or k.args[1] % (ka.dim() + 1) == ka.dim()):
                return k, v
        k, v = k.args[0], v.args[0]


def _exact_source(node: fx.Node) -> fx.Node:
    """Through widening (value-preserving) casts."""
    while node.op == "call_function" and node.target in WIDENING and \
            torch.promote_types(val(node.args[0]).dtype, val(node).dtype) == val(node).dtype:
        node = node.args[0]
    return node


def latent_cut(k: fx.Node, v: fx.Node) -> Optional[list[fx.Node]]:
    """If v's values are k's first d_v dims, the nodes both are computed from; else None."""
    d_v = val(v).shape[-1]
    try:
        kb, vb = same_view_bases(k, v)
    except Reject:
        return None
    kb, vb = _exact_source(kb), _exact_source(vb)
    if kb.op != "call_function" or not val(kb).shape[-1] >= d_v:
        return None
    if kb.target is aten.cat.default:
        parts, dim = kb.args[0], kb.args[1] if len(kb.args) > 1 else 0
        if dim in (-1, val(kb).dim() - 1) and parts[0] is vb:
            return list(parts)
    if vb.op == "call_function" and vb.target is aten.slice.Tensor:
        dim, start = vb.args[1], vb.args[2] if len(vb.args) > 2 else 0
        if dim not in (-1, val(kb).dim() - 1) or start not in (0, None) or val(vb.args[0]).shape != val(kb).shape:
            return None
        try:  # the sliced tensor is the key, possibly through its own copy of the same views
            kb, sliced = same_view_bases(kb, vb.args[0])
        except Reject:
            return None
        return [kb] if kb is sliced else None
    return None


def chain_start(node: fx.Node, existing: set) -> fx.Node:
    """The graph node an inserted permute/cast chain starts from."""
    while node not in existing:
        node = node.args[0]
    return node


def _zero(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A constant all-zero bias: a causal mask with nothing to mask (one query, e.g. decode) stays one."""
    return is_constant(node, {}) and not evaluate(gm, node).any()


def _gather_bias(graph: fx.Graph, bias: fx.Node, index: fx.Node, batch_seq, keys: int, like: fx.Node) -> fx.Node:
    """A head-independent mask [B|1, 1, S|1, T] read at the indices: [B, S, K] fp32 (invalid indices
    read key 0; the kernels skip them anyway)."""
    shape = val(bias).shape
    b3 = call(graph, aten.reshape.default, bias, [shape[0], shape[2], shape[3]], like=like)
    b3 = call(graph, aten.expand.default, b3, [*batch_seq, keys], like=like)
    idx = call(graph, aten.clamp.default, index, 0, keys - 1, like=like)
    if val(idx).dtype != torch.int64:
        idx = call(graph, aten.to.dtype, idx, torch.int64, like=like)
    out = call(graph, aten.gather.default, b3, -1, idx, like=like)
    return out if val(out).dtype == torch.float32 else call(graph, aten.to.dtype, out, torch.float32, like=like)


def _rewrite(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    graph = gm.graph
    q4, k4, v4, sink, bias, index, scale, lower, upper, _backend = node.args
    if sink is not None:
        raise Reject("an attention sink is not folded into the sparse kernels")
    if bias is not None and _zero(gm, bias):
        bias = None
    if bias is not None and val(bias).shape[1] != 1:
        raise Reject(f"a per-head bias {list(val(bias).shape)} is not folded into the sparse kernels")
    if lower is not None:
        raise Reject(f"a band lower bound j - i >= {lower} (sliding window) is not folded into the sparse kernels")
    outs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if len(outs) != len(node.users) or 1 in outs and outs[1].users or 0 not in outs:
        raise Reject("the attention's log-sum-exp is used")
    source = topk_source(index)
    if source is None:
        raise Reject("the indices are not a torch.topk / indexer_topk output: repeats cannot be ruled out "
                     "(a membership mask counts one once, a gather twice)")
    old = outs[0]
    existing = set(graph.nodes)
    with graph.inserting_before(old):
        q, k, v = (to_bshd(graph, x, old) for x in (q4, k4, v4))
        cut = latent_cut(k, v)
        exact = {exact_dtype_of(x) for x in (q, k, v)}
        dtype = exact.pop() if exact <= {torch.bfloat16} or exact <= {torch.float16} else val(q).dtype
        q, k = narrowed_to(graph, q, dtype, old), narrowed_to(graph, k, dtype, old)
        v = None if cut is not None else narrowed_to(graph, v, dtype, old)
        d_v = val(v4).shape[-1]
        gathered = None if bias is None else _gather_bias(graph, bias, index, val(q).shape[:2], val(k4).shape[2], old)
        args = dict(q=val(q), k=val(k), v=val(v), indices=val(index), bias=val(gathered), scale=scale, d_v=d_v,
                    upper=upper)
        backend, rejected = ctx.choose("sparse_attention", old, **args)
        if backend is None:
            return
        fused = call(graph, dsgraph_ops.sparse_attention.default, q, k, v, index, gathered, None, scale, d_v, upper, backend,
                     like=old)
        out = call(graph, operator.getitem, fused, 0, like=old)
        out = call(graph, aten.permute.default, out, [0, 2, 1, 3], like=old)
        if val(out).dtype != val(old).dtype:
            out = call(graph, aten.to.dtype, out, val(old).dtype, like=old)
    heads, hkv = val(q).shape[2], val(k).shape[2]
    detail = (f"{'latent (MQA)' if cut is not None else f'{heads}/{hkv} heads'}, H={heads} S={val(q).shape[1]} "
              f"T={val(k).shape[1]} D={val(k).shape[3]} Dv={d_v} top-{val(index).shape[-1]}, "
              f"{str(dtype).removeprefix('torch.')}" + ("" if upper is None else f", j - s <= {upper}")
              + ("" if bias is None else f", bias {list(val(bias).shape)} gathered"))
    # Verification draws random values for these: the indices' sources (scores), never repeated
    # indices; in latent mode what keys and values are both built from.
    kv_inputs = cut if cut is not None else [chain_start(k, existing), chain_start(v, existing)]
    inputs = [chain_start(q, existing), *kv_inputs, *source.all_input_nodes, *([bias] if bias is not None else [])]
    ctx.commit(gm, op="sparse_attention", old=old, new=out, inputs=inputs, backend=backend, rejected=rejected,
               detail=detail)
