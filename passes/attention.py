"""Eager attention -> ``dsgraph::attention``.

Recognises ``softmax(scale * q kᵀ + masks) v`` written with ``einsum``, ``matmul``/``@`` or ``bmm``:
- the scale anywhere (on the scores, on q or k, as ``*`` or ``/``), several masks (additive terms,
  ``masked_fill`` or ``where`` with -inf or a large negative), the softmax in fp32 or the input dtype;
- MHA, GQA and MQA: keys/values repeated with ``repeat_kv`` (unsqueeze/expand/reshape),
  ``repeat_interleave`` or broadcast, or an explicit group dimension in the einsum — the repeated
  keys are never materialised;
- an attention sink: a per-head logit concatenated as an extra softmax column and sliced off
  before the value product (gpt-oss, DeepSeek V4).

Masks from the masks pass fold into the op: ``band_mask`` -> ``lower``/``upper``, ``topk_mask`` ->
``topk``; any other mask becomes an additive ``bias`` kept in its compact (broadcast) shape.

Constraints (a site outside them is left alone and the report says why): softmax over the last dim;
no other use of the scores or probabilities; positive scale; masks that do not need gradients;
no reshape between the score product and the softmax. With ``bmm`` the heads
are flattened into the batch: GQA repeats and per-head sinks are not recovered there, and a mask
reshaped into that batch folds as a band only when it is all constant.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Optional, Sequence

import torch
import torch.fx as fx

from dsgraph.fxutil import CASTS, call, scalar, strip, val
from dsgraph.kernels.attention_flex import attention_flex
from dsgraph.pipeline import Pass, PassContext

aten = torch.ops.aten
dsgraph_ops = torch.ops.dsgraph

SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
PRODUCTS = {aten.einsum.default, aten.matmul.default, aten.bmm.default}
SCORE_CASTS = CASTS - {aten.to.device}
# Ops a mask may pass through while keeping its meaning (adding size-1 dims, broadcasting, casting).
MASK_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
              aten.expand.default, aten.clone.default, aten.alias.default, aten.contiguous.default}
MASK_CASTS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default}
MASKED_BELOW = -1e4  # as in the masks pass: fills at or below act as -inf


class Reject(Exception):
    """The site is attention but outside what the op serves; the message says why."""


@dataclasses.dataclass
class Product:
    """A batched product as einsum subscripts: ``out = a[a_sub] · b[b_sub]``."""

    a: fx.Node
    a_sub: str
    b: fx.Node
    b_sub: str
    out: str
    node: fx.Node

    @staticmethod
    def of(node: fx.Node) -> "Product":
        if node.target is aten.einsum.default:
            equation, operands = node.args[0].replace(" ", ""), node.args[1]
            if "..." in equation or "->" not in equation or len(operands) != 2:
                raise Reject(f"einsum {equation!r}: only explicit two-operand equations are matched")
            lhs, out = equation.split("->")
            a_sub, b_sub = lhs.split(",")
            return Product(operands[0], a_sub, operands[1], b_sub, out, node)
        a, b = node.args[:2]
        rank_a, rank_b = val(a).dim(), val(b).dim()
        if rank_a != rank_b or rank_a < 2:
            raise Reject(f"{node.target} of ranks {rank_a} and {rank_b}: batch dims must match")
        batch = "ABCEFGHIJK"[: rank_a - 2]
        return Product(a, batch + "SX", b, batch + "XT", batch + "ST", node)

    def sizes(self, which: str) -> dict[str, int]:
        node, sub = (self.a, self.a_sub) if which == "a" else (self.b, self.b_sub)
        return dict(zip(sub, val(node).shape))


def _see_through(node: fx.Node, sub: str, gm: fx.GraphModule, constant: dict) -> tuple[fx.Node, str, float]:
    """Follow transposes/permutes (relabelling subscripts) and scalar scalings of an operand."""
    factor = 1.0
    while node.op == "call_function":
        if node.target is aten.transpose.int:
            d0, d1 = (d % len(sub) for d in node.args[1:3])
            letters = list(sub)
            letters[d0], letters[d1] = letters[d1], letters[d0]
            node, sub = node.args[0], "".join(letters)
        elif node.target is aten.t.default:
            node, sub = node.args[0], sub[::-1]
        elif node.target is aten.permute.default:
            perm = [d % len(sub) for d in node.args[1]]
            letters = [""] * len(sub)
            for out_dim, in_dim in enumerate(perm):
                letters[in_dim] = sub[out_dim]
            node, sub = node.args[0], "".join(letters)
        elif node.target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            c = scalar(node.args[1], gm, constant)
            if c is None or c <= 0 or not isinstance(node.args[0], fx.Node):
                break
            factor = factor * c if node.target in (aten.mul.Tensor, aten.mul.Scalar) else factor / c
            node = node.args[0]
        else:
            break
    return node, sub, factor


def _strip_repeat(node: fx.Node) -> fx.Node:
    """The un-repeated keys/values behind ``repeat_kv``, ``repeat_interleave`` or ``expand``."""
    if node.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        expanded = strip(node.args[0], {aten.clone.default, aten.contiguous.default})
        if expanded.op == "call_function" and expanded.target is aten.expand.default:
            unsq = expanded.args[0]
            if unsq.op == "call_function" and unsq.target is aten.unsqueeze.default:
                base = unsq.args[0]
                dim = unsq.args[1] % (val(base).dim() + 1)
                base_shape, out_shape = list(val(base).shape), list(val(node).shape)
                group = val(expanded).shape[dim]
                if (dim >= 1 and len(out_shape) == len(base_shape)
                        and out_shape[dim - 1] == base_shape[dim - 1] * group
                        and out_shape[:dim - 1] + out_shape[dim:] == base_shape[:dim - 1] + base_shape[dim:]):
                    return base
    if node.target is aten.repeat_interleave.self_int and len(node.args) >= 3:
        return node.args[0]
    if node.target is aten.expand.default and val(node.args[0]).dim() == val(node).dim():
        return node.args[0]
    return node


@dataclasses.dataclass
class Layout:
    """How the score letters map to the op's [B, H, S, T] layout."""

    batch: Optional[str]   # the letter that becomes B (None: B = 1)
    heads: list[str]       # letters merged into H, outermost first
    s: str
    t: str
    d: str

    @property
    def order(self) -> list[str]:
        return ([self.batch] if self.batch else []) + self.heads + [self.s, self.t]


def _layout(prod: Product, mask_shapes: Sequence[Sequence[int]] = ()) -> Layout:
    out = prod.out
    t = out[-1]
    if t not in prod.b_sub or t in prod.a_sub:
        raise Reject("the softmax dim is not the key dim of the score product")
    contracted = [c for c in prod.a_sub if c in prod.b_sub and c not in out]
    if len(contracted) != 1:
        raise Reject(f"score product contracts {len(contracted)} dims, expected 1")
    a_only = [c for c in out if c in prod.a_sub and c not in prod.b_sub]
    if not a_only:
        raise Reject("no query dim in the score product")
    shared = [c for c in out if c in prod.a_sub and c in prod.b_sub]
    if len(shared) + len(a_only) + 1 != len(out) or sorted(prod.a_sub) != sorted(shared + a_only + contracted):
        raise Reject(f"score product {prod.a_sub},{prod.b_sub}->{out} has unsupported dims")
    s = a_only[-1]
    if len(a_only) > 1:
        # Several query-only dims (MQA: "bshc,btc->bsht"): every choice computes the same, but only the
        # query dim lets a band fold: take the one dim the masks vary along, if they tell.
        from_end = {c: len(out) - out.index(c) for c in a_only}  # masks broadcast from the right
        along = [c for c in a_only if any(len(shape) >= from_end[c] and shape[-from_end[c]] > 1
                                          for shape in mask_shapes)]
        s = along[0] if len(along) == 1 else s
    return Layout(shared[0] if shared else None, shared[1:] + [c for c in a_only if c != s], s, t, contracted[0])


def _group(layout: Layout, q_sizes: dict, kv_sizes: dict) -> int:
    """Query heads per kv head; raises unless q head h reads kv head h // group."""
    if layout.batch and q_sizes[layout.batch] != kv_sizes[layout.batch]:
        raise Reject("keys broadcast over the batch")
    group = 1
    for i, letter in enumerate(layout.heads):
        nq, nkv = q_sizes[letter], kv_sizes.get(letter, 1)
        if nq == nkv:
            if group != 1:
                raise Reject("grouped heads are not the innermost head dim")
            continue
        if nkv == 0 or nq % nkv:
            raise Reject(f"{nq} query heads do not divide over {nkv} kv heads")
        if i != len(layout.heads) - 1 and nkv != 1:
            raise Reject("grouped heads are not the innermost head dim")
        group *= nq // nkv
    return group


class AttentionPass(Pass):
    name = "attention"
    needs = ("symbolic_masks",)
    provides = ("fused_attention",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in SOFTMAX and node.graph is gm.graph:
                try:
                    _Site(gm, node, ctx).rewrite()
                except Reject as exc:
                    ctx.skip(node, str(exc))


class _Site:
    # Fills at or below this mask a position: a softmax follows, where they act as -inf.
    masked_below = MASKED_BELOW

    def __init__(self, gm: fx.GraphModule, softmax: fx.Node, ctx: PassContext):
        self.gm, self.graph, self.softmax, self.ctx = gm, gm.graph, softmax, ctx
        self.constant: dict = {}

    # --- matching -------------------------------------------------------------------------
    def rewrite(self) -> None:
        sm = self.softmax
        if sm.args[1] not in (-1, val(sm).dim() - 1):
            raise Reject(f"softmax over dim {sm.args[1]}, not the last")
        qk_node, mult, terms, sink_col = self._scores(sm.args[0])
        pv_node, p_sub_node = self._values(sm, sink_col is not None)
        qk, pv = Product.of(qk_node), Product.of(pv_node)
        if pv.a is not p_sub_node:
            raise Reject("the probabilities are not the left operand of the value product")
        q, q_sub, q_factor = _see_through(qk.a, qk.a_sub, self.gm, self.constant)
        k, k_sub, k_factor = _see_through(qk.b, qk.b_sub, self.gm, self.constant)
        qk = Product(q, q_sub, k, k_sub, qk.out, qk.node)
        mask_shapes = [val(strip(node, {aten.expand.default})).shape for _, node, _ in terms
                       if isinstance(node, fx.Node)]
        layout = _layout(qk, mask_shapes)
        roles = dict(zip(pv.a_sub, qk.out))  # PV letters -> score letters
        v, v_sub, v_factor = _see_through(pv.b, pv.b_sub, self.gm, self.constant)
        if v_factor != 1.0:
            raise Reject("a scaling of the values is not folded")
        contracted = [c for c in pv.a_sub if c in v_sub and c not in pv.out]
        if [roles[c] for c in contracted] != [layout.t]:
            raise Reject("the value product does not contract the key dim")
        dv = [c for c in v_sub if c not in pv.a_sub]
        if len(dv) != 1 or dv[0] not in pv.out:
            raise Reject("the value product has no single value dim")
        v_roles = "".join(roles.get(c, "#") for c in v_sub)  # '#' marks the value dim
        k, v, group = self._kv(layout, qk, k, v, v_roles)
        dtypes = {val(x).dtype for x in (q, k, v)}
        if not all(d.is_floating_point for d in dtypes):
            raise Reject(f"non-float q/k/v ({', '.join(map(str, dtypes))})")
        # Mixed dtypes (e.g. fp32 q/k with bf16 v, as MLA writes it): the op runs in the widest one.
        compute_dtype = functools.reduce(torch.promote_types, dtypes)

        scale = mult * q_factor * k_factor
        with self.graph.inserting_before(pv_node):
            q, k, v = (x if val(x).dtype == compute_dtype else call(self.graph, aten.to.dtype, x, compute_dtype, like=pv_node)
                       for x in (q, k, v))
            q4 = self._canonical(q, qk.a_sub, layout, layout.heads, [layout.s, layout.d], like=pv_node)
            k4 = self._canonical(k, qk.b_sub, layout, [h for h in layout.heads if h in qk.b_sub],
                                 [layout.t, layout.d], like=pv_node)
            v4 = self._canonical(v, v_roles, layout, [h for h in layout.heads if h in v_roles],
                                 [layout.t, "#"], like=pv_node)
            lower, upper, topk, bias, bias_inputs = self._masks(terms, layout, qk, like=pv_node)
            sink = self._sink(sink_col, layout, qk, like=pv_node) if sink_col is not None else None
            args = dict(q=val(q4), k=val(k4), v=val(v4), sink=val(sink), bias=val(bias), topk=val(topk),
                        scale=scale, lower=lower, upper=upper)
            backend, rejected = self.ctx.choose("attention", pv_node, **args)
            if backend is None:
                return
            if backend == "sdpa":  # PyTorch's own op: Inductor lowers it, forward and backward
                if bias is not None:
                    bias = call(self.graph, aten.to.dtype, bias, compute_dtype, like=pv_node)
                out = call(self.graph, aten.scaled_dot_product_attention.default, q4, k4, v4, bias, 0.0,
                           upper == 0, scale=scale, enable_gqa=group > 1, like=pv_node)
            elif backend == "flex":  # PyTorch's FlexAttention: Inductor lowers it, forward and backward
                out = call(self.graph, attention_flex, q4, k4, v4, sink, scale, lower, upper, like=pv_node)
            else:
                fused = call(self.graph, dsgraph_ops.attention.default, q4, k4, v4, sink, bias, topk, scale,
                             lower, upper, backend, like=pv_node)
                out = call(self.graph, operator.getitem, fused, 0, like=pv_node)
            out = self._restore(out, layout, qk, pv, roles, like=pv_node)
        inputs = [strip(x, {aten.to.dtype}) for x in (q, k, v)] + bias_inputs + ([topk] if topk is not None else []) + ([strip(sink_col, {aten.expand.default})] if sink is not None else [])
        detail = self._describe(val(q4), val(k4), group, lower, upper, topk, bias, sink, scale)
        self.ctx.commit(self.gm, op="attention", old=pv_node, new=out, inputs=inputs, backend=backend,
                        rejected=rejected, detail=detail)

    def _scores(self, node: fx.Node):
        """Walk from the softmax input down to the score product: scale, masks, sink column."""
        chain = [node]
        node = strip(node, SCORE_CASTS)
        sink_col = None
        if node.op == "call_function" and node.target is aten.cat.default:
            parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
            if len(parts) != 2 or dim not in (-1, val(node).dim() - 1) or val(parts[1]).shape[-1] != 1:
                raise Reject("a concatenation before the softmax that is not one sink column")
            chain.append(node)
            node, sink_col = strip(parts[0], SCORE_CASTS), parts[1]
        mult, terms = 1.0, []
        while True:
            chain.append(node)
            if node.op != "call_function":
                raise Reject("the softmax input is not computed from a score product")
            target = node.target
            if target in SCORE_CASTS:
                node = node.args[0]
                continue
            if target in PRODUCTS:
                break
            if target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
                x, c = node.args[:2]
                if not self._chain(x) and isinstance(c, fx.Node) and target is aten.mul.Tensor:
                    x, c = c, x
                factor = scalar(c, self.gm, self.constant)
                if factor is None or factor <= 0:
                    raise Reject(f"scores scaled by a non-constant or non-positive factor ({c})")
                mult = mult * factor if target in (aten.mul.Tensor, aten.mul.Scalar) else mult / factor
                node = x
            elif target in (aten.add.Tensor, aten.sub.Tensor):
                a, b = node.args[:2]
                alpha = node.kwargs.get("alpha", 1)
                if self._chain(a):
                    sign = -1.0 if target is aten.sub.Tensor else 1.0
                    terms.append(("add", b, mult * sign * alpha))
                    node = a
                elif target is aten.add.Tensor and self._chain(b) and alpha == 1:
                    terms.append(("add", a, mult))
                    node = b
                else:
                    raise Reject("an addition to the scores the pass cannot attribute")
            elif target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
                x, cond, fill = node.args[:3]
                fill = scalar(fill, self.gm, self.constant)
                if fill is None or fill > MASKED_BELOW:
                    raise Reject(f"masked_fill with {fill}: only -inf or large negative fills are masks")
                terms.append(("blocked", cond, fill * mult))
                node = x
            elif target in (aten.where.self, aten.where.ScalarOther):
                cond, x, fill = node.args[:3]
                fill = scalar(fill, self.gm, self.constant)
                if fill is None or fill > MASKED_BELOW:
                    raise Reject("where(cond, scores, other) with other not -inf or a large negative")
                terms.append(("allowed", cond, fill * mult))
                node = x
            else:
                raise Reject(f"{target} between the score product and the softmax")
        for inner in chain[1:]:
            if len(inner.users) != 1:
                raise Reject(f"the scores ({inner.name}) are also used outside the attention")
        return node, mult, terms, sink_col

    def _chain(self, node) -> bool:
        """Does ``node`` lie on the path from the score product (through scalings/masks/casts)?"""
        while isinstance(node, fx.Node) and node.op == "call_function":
            if node.target in PRODUCTS:
                return True
            if node.target in SCORE_CASTS or node.target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
                                                             aten.div.Scalar, aten.masked_fill.Scalar,
                                                             aten.masked_fill.Tensor):
                node = node.args[0]
            elif node.target in (aten.where.self, aten.where.ScalarOther):
                node = node.args[1]
            elif node.target in (aten.add.Tensor, aten.sub.Tensor):
                return self._chain(node.args[0]) or self._chain(node.args[1])
            else:
                return False
        return False

    def _values(self, softmax: fx.Node, has_sink: bool):
        """Follow the probabilities to the value product (through casts and the sink slice)."""
        node, sliced = softmax, False
        while True:
            users = list(node.users)
            if len(users) != 1:
                raise Reject(f"the attention probabilities ({node.name}) are also used outside the attention")
            user = users[0]
            if user.op == "call_function" and user.target in PRODUCTS:
                if has_sink and not sliced:
                    raise Reject("the sink column reaches the value product")
                return user, node
            if user.op == "call_function" and user.target in SCORE_CASTS:
                node = user
            elif user.op == "call_function" and user.target is aten.dropout.default and (
                    user.args[1] == 0 or not user.args[2]):
                node = user
            elif has_sink and not sliced and user.op == "call_function" and user.target is aten.slice.Tensor:
                dim = user.args[1] if len(user.args) > 1 else 0
                width = val(node).shape[-1]
                if dim not in (-1, val(node).dim() - 1) or val(user).shape[-1] != width - 1 or (
                        len(user.args) > 2 and user.args[2] not in (0, None)):
                    raise Reject("the sink column is not sliced off the end")
                node, sliced = user, True
            else:
                raise Reject(f"the attention probabilities go to {user.target}, not a value product")

    def _kv(self, layout: Layout, qk: Product, k: fx.Node, v: fx.Node, v_roles: str):
        """Strip repeat_kv/repeat_interleave/expand from k and v when both agree on the kv heads."""
        q_sizes = qk.sizes("a")
        for k_try, v_try in ((_strip_repeat(k), _strip_repeat(v)), (k, v)):
            k_sizes = dict(zip(qk.b_sub, val(k_try).shape))
            v_sizes = dict(zip(v_roles, val(v_try).shape))
            try:
                group = _group(layout, q_sizes, k_sizes)
                if _group(layout, q_sizes, v_sizes) != group or any(
                        k_sizes.get(h, 1) != v_sizes.get(h, 1) for h in layout.heads):
                    continue
                return k_try, v_try, group
            except Reject:
                continue
        raise Reject("keys and values do not map onto the query heads as h -> h // group")

    # --- building -------------------------------------------------------------------------
    def _canonical(self, node: fx.Node, sub: str, layout: Layout, heads: list[str], tail: list[str], *,
                   like) -> fx.Node:
        """Permute ``node`` (subscripts ``sub``) to batch + heads + tail and merge the head letters,
        giving [B, H, L, D] (B = 1 or H = 1 when those letters are absent)."""
        batch = [layout.batch] if layout.batch else []
        order = batch + heads + tail
        perm = [sub.index(c) for c in order]
        if perm != list(range(len(perm))):
            node = call(self.graph, aten.permute.default, node, perm, like=like)
        shape = list(val(node).shape)
        target = (shape[:1] if batch else [1]) + [math.prod(shape[len(batch):-2])] + shape[-2:]
        if target != shape:
            node = call(self.graph, aten.reshape.default, node, target, like=like)
        return node

    def _split(self, kind: str, node, mult: float) -> list:
        """Split combined masks into terms that fold separately: sums of additive masks,
        ``zeros.masked_fill(cond, -inf)`` and ``where(cond, 0, -inf)``, conjunctions of allowed
        and disjunctions of blocked conditions, negations."""
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return [(kind, node, mult)]
        target, args = node.target, node.args
        if target is aten.expand.default:
            return self._split(kind, args[0], mult)
        if target in (aten.transpose.int, aten.permute.default, aten.unsqueeze.default):
            parts = self._split(kind, args[0], mult)
            if len(parts) == 1 and parts[0][1] is args[0]:
                return [(kind, node, mult)]
            rank = val(args[0]).dim()
            moved = []
            for part_kind, part, part_mult in parts:  # apply the same dim shuffle to each part
                shape = list(val(part).shape)
                if len(shape) < rank:
                    part = call(self.graph, aten.view.default, part, [1] * (rank - len(shape)) + shape, like=node)
                moved.append((part_kind, call(self.graph, target, part, *args[1:], like=node), part_mult))
            return moved
        if kind == "add":
            if target is aten.add.Tensor and all(isinstance(a, fx.Node) for a in args[:2]) and \
                    node.kwargs.get("alpha", 1) == 1:
                return self._split("add", args[0], mult) + self._split("add", args[1], mult)
            if target is aten.masked_fill.Scalar and self._zeros(args[0]):
                fill = scalar(args[2], self.gm, self.constant)
                if fill is not None and fill <= self.masked_below:
                    return self._split("blocked", args[1], fill * mult)
            if target is aten.where.self and isinstance(args[0], fx.Node):
                a, b = (scalar(x, self.gm, self.constant) for x in args[1:3])
                if a == 0 and b is not None and b <= self.masked_below:
                    return self._split("allowed", args[0], b * mult)
                if b == 0 and a is not None and a <= self.masked_below:
                    return self._split("blocked", args[0], a * mult)
            return [(kind, node, mult)]
        conjunction = {"allowed": (aten.__and__.Tensor, aten.logical_and.default, aten.bitwise_and.Tensor),
                       "blocked": (aten.__or__.Tensor, aten.logical_or.default, aten.bitwise_or.Tensor)}[kind]
        if target in conjunction and all(isinstance(a, fx.Node) for a in args[:2]):
            return self._split(kind, args[0], mult) + self._split(kind, args[1], mult)
        if target in (aten.bitwise_not.default, aten.logical_not.default):
            return self._split("blocked" if kind == "allowed" else "allowed", args[0], mult)
        return [(kind, node, mult)]

    def _zeros(self, node) -> bool:
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return False
        if node.target in (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default):
            return True
        return node.target is aten.full.default and node.args[1] == 0

    def _masks(self, terms, layout: Layout, qk: Product, *, like):
        lower, upper, topk, biases, inputs = None, None, None, [], []
        terms = [t for term in terms for t in self._split(*term)]
        for kind, node, mult in terms:
            # A band that enters with the wrong sign (scores - mask: +inf) stays a bias, exactly as written.
            band = self._band(node, kind, layout, qk) if (mult > 0) == (kind == "add") else None
            if band is not None:
                lower = band[0] if lower is None else (lower if band[0] is None else max(lower, band[0]))
                upper = band[1] if upper is None else (upper if band[1] is None else min(upper, band[1]))
                continue
            index = self._topk(node, kind, layout, qk)
            if index is not None:
                if topk is not None:
                    raise Reject("two top-k index masks on one attention")
                topk = index
                continue
            if node in self.ctx.requires_grad:
                raise Reject(f"the mask {node.name} requires grad (learned biases are not folded)")
            compact = strip(node, {aten.expand.default})
            inputs.append(compact)
            term = self._canonical_mask(compact, layout, qk, like=like)
            if kind == "add":
                term = call(self.graph, aten.to.dtype, term, torch.float32, like=like)
                if mult != 1.0:
                    term = call(self.graph, aten.mul.Tensor, term, mult, like=like)
            else:  # a boolean condition: masked where True ("blocked") or where False ("allowed")
                zero = call(self.graph, aten.scalar_tensor.default, 0.0, dtype=torch.float32,
                            device=val(compact).device, like=like)
                fill = call(self.graph, aten.scalar_tensor.default, mult, dtype=torch.float32,
                            device=val(compact).device, like=like)
                branches = (fill, zero) if kind == "blocked" else (zero, fill)
                term = call(self.graph, aten.where.self, term, *branches, like=like)
            biases.append(term)
        bias = None
        for term in biases:
            bias = term if bias is None else call(self.graph, aten.add.Tensor, bias, term, like=like)
        return lower, upper, topk, bias, inputs

    def _canonical_mask(self, node: fx.Node, layout: Layout, qk: Product, *, like) -> fx.Node:
        """A mask broadcastable to the scores -> broadcastable to [B, H, S, T], still compact."""
        rank = len(qk.out)
        shape = list(val(node).shape)
        if len(shape) < rank:
            node = call(self.graph, aten.view.default, node, [1] * (rank - len(shape)) + shape, like=like)
        perm = [qk.out.index(c) for c in layout.order]
        if perm != list(range(rank)):
            node = call(self.graph, aten.permute.default, node, perm, like=like)
        shape = list(val(node).shape)
        nb = 1 if layout.batch else 0
        head_sizes = shape[nb:nb + len(layout.heads)]
        if any(h != 1 for h in head_sizes) and len(head_sizes) > 1:
            q_sizes = qk.sizes("a")
            full = shape[:nb] + [q_sizes[h] for h in layout.heads] + shape[-2:]
            node = call(self.graph, aten.expand.default, node, full, like=like)
            head = math.prod(full[nb:-2])
        else:
            head = math.prod(head_sizes)
        target = (shape[:nb] if nb else [1]) + [head] + shape[-2:]
        if target != list(val(node).shape):
            node = call(self.graph, aten.reshape.default, node, target, like=like)
        return node

    def _mask_source(self, node: fx.Node, op) -> tuple[Optional[fx.Node], bool]:
        """Follow shape-preserving views/casts back to an ``op`` node; also report logical negation."""
        negated = False
        while isinstance(node, fx.Node) and node.op == "call_function":
            if node.target is op:
                return node, negated
            if node.target in (aten.logical_not.default, aten.bitwise_not.default):
                negated = not negated
            elif node.target in MASK_VIEWS:
                if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
                    before, after = list(val(node.args[0]).shape), list(val(node).shape)
                    # size-1 dims added/removed, or leading dims merged/split with [rows, cols] kept
                    if [s for s in after if s != 1] != [s for s in before if s != 1] and (
                            before[-2:] != after[-2:]):
                        return None, False
            elif node.target in (aten.transpose.int, aten.permute.default):
                shape = val(node.args[0]).shape
                perm = list(range(len(shape)))
                if node.target is aten.transpose.int:
                    d0, d1 = (d % len(shape) for d in node.args[1:3])
                    perm[d0], perm[d1] = perm[d1], perm[d0]
                else:
                    perm = [d % len(shape) for d in node.args[1]]
                moved = [d for d in perm if shape[d] != 1]
                if moved != sorted(moved):
                    return None, False  # the mask's own dims change order
            elif node.target in MASK_CASTS:
                if val(node).dtype != val(node.args[0]).dtype and val(node.args[0]).dtype == torch.bool:
                    return None, False
            else:
                return None, False
            node = node.args[0]
        return None, False

    def _canonical_shape(self, node: fx.Node, layout: Layout, qk: Product) -> list[int]:
        shape = list(val(strip(node, {aten.expand.default})).shape)
        shape = [1] * (len(qk.out) - len(shape)) + shape
        return [shape[qk.out.index(c)] for c in layout.order]

    def _band(self, node, kind, layout, qk) -> Optional[tuple]:
        src, negated = self._mask_source(node, dsgraph_ops.band_mask.default)
        if src is None:
            return None
        rows, cols, lower, upper, dtype, fill, invert = src.args[:7]
        if dtype == torch.bool:
            blocked = invert != negated
            if kind == "add" or blocked != (kind == "blocked"):
                return None
        elif kind != "add" or negated or fill > self.masked_below:
            return None
        # Views only replicate the [rows, cols] band over other dims; it must land on [S, T].
        if self._canonical_shape(node, layout, qk)[-2:] != [rows, cols]:
            return None
        return lower, upper

    def _topk(self, node, kind, layout, qk) -> Optional[fx.Node]:
        src, negated = self._mask_source(node, dsgraph_ops.topk_mask.default)
        if src is None or kind != "add" or negated:
            return None
        index = src.args[0]
        canon = self._canonical_shape(node, layout, qk)
        index_shape = list(val(index).shape)
        expected = [index_shape[0]] * bool(layout.batch) + [1] * len(layout.heads) + index_shape[1:2] + [src.args[1]]
        if len(index_shape) != 3 or (not layout.batch and index_shape[0] != 1) or canon != expected:
            return None  # not one index row per query (e.g. reshaped into bmm's batch): a bias
        return index

    def _sink(self, sink_col: fx.Node, layout: Layout, qk: Product, *, like) -> fx.Node:
        compact = strip(sink_col, {aten.expand.default})
        canon = self._canonical_shape(compact, layout, qk)
        first_head = 1 if layout.batch else 0
        if any(s != 1 for i, s in enumerate(canon) if not first_head <= i < first_head + len(layout.heads)):
            raise Reject(f"the sink column varies over batch or queries (shape {canon})")
        sink = self._canonical_mask(compact, layout, qk, like=like)
        sink = call(self.graph, aten.reshape.default, sink, [-1], like=like)
        sizes = qk.sizes("a")
        heads = math.prod(sizes[h] for h in layout.heads)
        if val(sink).shape[0] != heads:
            sink = call(self.graph, aten.expand.default, sink, [heads], like=like)
        return sink

    def _restore(self, out: fx.Node, layout: Layout, qk: Product, pv: Product, roles, *, like) -> fx.Node:
        """[B, H, S, Dv] -> the layout and dtype the eager value product produced."""
        sizes = qk.sizes("a")
        role_order = layout.order[:-1] + ["#"]
        dv = val(out).shape[-1]
        full = [sizes[c] for c in layout.order[:-2]] + [sizes[layout.s], dv]
        if full != list(val(out).shape):
            out = call(self.graph, aten.reshape.default, out, full, like=like)
        out_roles = [roles.get(c, "#") for c in pv.out]
        perm = [role_order.index(r) for r in out_roles]
        if perm != list(range(len(perm))):
            out = call(self.graph, aten.permute.default, out, perm, like=like)
        target = val(pv.node)
        if list(val(out).shape) != list(target.shape):
            out = call(self.graph, aten.reshape.default, out, list(target.shape), like=like)
        if val(out).dtype != target.dtype:
            out = call(self.graph, aten.to.dtype, out, target.dtype, like=like)
        return out

    @staticmethod
    def _describe(q, k, group, lower, upper, topk, bias, sink, scale) -> str:
        parts = [f"{q.shape[1]}/{k.shape[1]} heads" + (f" (GQA x{group})" if group > 1 else ""),
                 f"S={q.shape[2]} T={k.shape[2]} D={q.shape[3]}", f"scale {scale:.4g}"]
        if lower is not None or upper is not None:
            parts.append(f"band {lower} <= j-i <= {upper}")
        if topk is not None:
            parts.append(f"top-{topk.meta['val'].shape[-1]}")
        if bias is not None:
            parts.append(f"bias {list(val(bias).shape)}")
        if sink is not None:
            parts.append("sink")
        return ", ".join(parts)
