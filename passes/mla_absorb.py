"""MLA absorption: MHA-mode sparse MLA attention -> the latent (MQA) form.

DeepSeek's prefill expands the compressed latent into per-head keys and values,
``k_nope, v = split(kv_b_proj(latent).view(B, T, H, Dn + Dv), [Dn, Dv])``,
``k = cat([k_nope, k_rope.expand(H)])``, ``q = cat([q_nope, q_rope])``. With W = kv_b_proj.weight
viewed [H, Dn + Dv, C] (W_uk its first Dn rows per head, W_uv the rest), q_nope . k_nope =
(q_nope W_uk) . latent and p v = (p latent) W_uv, so the site is rewritten to

    q' = cat([einsum(q_nope, W_uk), q_rope])            [B, S, H, C + R]
    kv' = cat([latent, k_rope]).unsqueeze(2)            [B, T, 1, C + R]  (one key shared by all heads)
    out = einsum(sparse_attention(q', kv', v=None, d_v=C), W_uv)

using W itself, so gradients reach ``kv_b_proj.weight`` (and the latent, q, k_rope) as before; the
per-head keys and values are no longer built (their projection becomes dead code).

Matched on ``dsgraph::sparse_attention`` sites (after the sparse-attention pass) in MHA mode whose
operands come from that pattern through widening casts; ``kv_b_proj`` without a bias.

Policy rule (roofline per query and gathered key; a gathered row is read once per kv head, and
per-head rows are not shared between heads): MHA mode moves H (Dqk + Dv) elements for 2 H (Dqk + Dv)
flops, latent mode C + R elements for 2 H (2C + R) flops. Cost = max(flops / RIDGE, elements) with
RIDGE = 512 flops per element (H100 bf16: 989 TFLOP/s over 3.35 TB/s ~ 295 flops per byte), and the
site is absorbed when the latent cost is lower: for V3.2 (H=128, 192/128, C=512, R=64) 40960 vs 576;
it stops paying only around H <= 2. Dense (non-sparse) prefill attention is not absorbed: there the
per-head keys are reused across a whole query tile and MHA mode does fewer flops.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from dsgraph.fxutil import call, strip, val
from dsgraph.pipeline import Pass, PassContext

from .sparse_attention import WIDENING, topk_source

aten = torch.ops.aten
dsgraph_ops = torch.ops.dsgraph

RIDGE = 512


class Reject(Exception):
    """A sparse MHA site that is not an absorbable MLA expansion; the message says why."""


def absorb_profitable(heads: int, d_qk: int, d_v: int, latent: int, rope: int) -> bool:
    mha = max(2 * heads * (d_qk + d_v) / RIDGE, heads * (d_qk + d_v))
    absorbed = max(2 * heads * (2 * latent + rope) / RIDGE, latent + rope)
    return absorbed < mha


class MLAAbsorbPass(Pass):
    name = "mla_absorb"
    needs = ("sparse_attention",)
    provides = ("mla_absorbed",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is dsgraph_ops.sparse_attention.default \
                    and node.args[2] is not None:
                try:
                    _absorb(gm, node, ctx)
                except Reject as exc:
                    ctx.skip(node, f"MLA absorption: {exc}")


def _cat2(node: fx.Node, what: str) -> tuple[fx.Node, fx.Node]:
    node = strip(node, WIDENING)
    if node.op != "call_function" or node.target is not aten.cat.default or len(node.args[0]) != 2 or \
            (node.args[1] if len(node.args) > 1 else 0) not in (-1, val(node).dim() - 1):
        raise Reject(f"{what} is not a concatenation of two parts over the head dim")
    return tuple(node.args[0])


def _split_part(node: fx.Node) -> tuple[fx.Node, int]:
    node = strip(node, WIDENING)
    if node.target is not operator.getitem or node.args[0].target is not aten.split_with_sizes.default:
        raise Reject("the keys' nope part / the values are not a split of one projection")
    split = node.args[0]
    if (split.args[2] if len(split.args) > 2 else 0) not in (-1, val(split.args[0]).dim() - 1) or \
            len(split.args[1]) != 2:
        raise Reject("the projection is not split in two over the head dim")
    return split, node.args[1]


def _rope_key(node: fx.Node, heads: int) -> Optional[fx.Node]:
    """k_rope [B, T, R] behind ``k_rope.unsqueeze(2).expand(B, T, H, R)``."""
    node = strip(node, WIDENING)
    if node.target is not aten.expand.default:
        return None
    unsq = node.args[0]
    if unsq.target is not aten.unsqueeze.default or unsq.args[1] not in (2, -2) or val(unsq.args[0]).dim() != 3:
        return None
    return unsq.args[0]


def _absorb(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    graph = gm.graph
    q, k, v, index, bias, sink, scale, d_v, upper, _backend = node.args
    batch, seq, heads, d_qk = val(q).shape
    if val(k).shape[2] != heads:
        raise Reject("the keys are not per head")
    q_nope, q_rope = _cat2(q, "q")
    k_nope, k_rope_h = _cat2(k, "k")
    k_rope = _rope_key(k_rope_h, heads)
    if k_rope is None:
        raise Reject("the keys' rope part is not one key broadcast over the heads")
    split, which = _split_part(k_nope)
    vsplit, vwhich = _split_part(v)
    if vsplit is not split or (which, vwhich) != (0, 1):
        raise Reject("the keys' nope part and the values are not the two parts of one split")
    view = split.args[0]
    if view.target not in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        raise Reject("the split input is not the projection viewed per head")
    proj = view.args[0]
    if proj.target is not aten.linear.default or (len(proj.args) > 2 and proj.args[2] is not None):
        raise Reject("the per-head keys and values are not one bias-free linear projection")
    latent, weight = proj.args[:2]
    d_nope, d_lat, d_rope = val(k_nope).shape[-1], val(latent).shape[-1], val(k_rope).shape[-1]
    if val(latent).dim() != 3 or list(val(view).shape) != [batch, val(k).shape[1], heads, d_nope + d_v] or \
            val(q_nope).shape[-1] != d_nope:
        raise Reject("the projection's shapes do not match the heads")
    if not absorb_profitable(heads, d_qk, d_v, d_lat, d_rope):
        raise Reject(f"not profitable for H={heads}, {d_qk}/{d_v} dims, latent {d_lat}+{d_rope} (see the pass's rule)")
    outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    if len(outs) != 1 or any(u.args[1] != 0 and u.users for u in node.users):
        raise Reject("the attention's log-sum-exp is used")
    old, dtype = outs[0], val(q).dtype
    source = topk_source(index)
    with graph.inserting_before(old):
        def cast(x):
            return x if val(x).dtype == dtype else call(graph, aten.to.dtype, x, dtype, like=old)

        w = call(graph, aten.view.default, cast(weight), [heads, d_nope + d_v, d_lat], like=old)
        w_uk = call(graph, aten.slice.Tensor, w, 1, 0, d_nope, like=old)
        w_uv = call(graph, aten.slice.Tensor, w, 1, d_nope, d_nope + d_v, like=old)
        q_lat = call(graph, aten.einsum.default, "bshd,hdc->bshc", [cast(q_nope), w_uk], like=old)
        q2 = call(graph, aten.cat.default, [q_lat, cast(q_rope)], -1, like=old)
        kv = call(graph, aten.cat.default, [cast(latent), cast(k_rope)], -1, like=old)
        kv = call(graph, aten.unsqueeze.default, kv, 2, like=old)
        args = dict(q=val(q2), k=val(kv), v=None, indices=val(index), bias=val(bias), scale=scale, d_v=d_lat,
                    upper=upper)
        backend, rejected = ctx.choose("sparse_attention", old, **args)
        if backend is None:
            return
        fused = call(graph, dsgraph_ops.sparse_attention.default, q2, kv, None, index, bias, sink, scale, d_lat, upper,
                     backend, like=old)
        out = call(graph, operator.getitem, fused, 0, like=old)
        out = call(graph, aten.einsum.default, "bshc,hdc->bshd", [out, w_uv], like=old)
    detail = (f"latent {d_lat}+{d_rope} for {heads} heads ({d_nope}+{d_rope}/{d_v}), S={seq} T={val(k).shape[1]} "
              f"top-{val(index).shape[-1]}, {str(dtype).removeprefix('torch.')}")
    inputs = [q_nope, q_rope, latent, weight, k_rope, *(source.all_input_nodes if source is not None else [index]),
              *([bias] if bias is not None else [])]
    ctx.commit(gm, op="sparse_attention", old=old, new=out, inputs=inputs, backend=backend, rejected=rejected,
               detail=detail)
