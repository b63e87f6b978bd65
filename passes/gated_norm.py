"""Gated RMSNorm -> ``dsgraph::gated_rmsnorm``.

Recognises ``rmsnorm_group(x · silu(gate)) · weight`` (Mamba2's ``MambaRMSNormGated``,
``norm_before_gate=False``) however eager code writes it:
- the gate: ``F.silu(gate)`` or ``gate * torch.sigmoid(gate)``, times x (either order), with
  ``.float()`` (widening) casts of x and gate;
- the groups: a ``view``/``reshape``/``unflatten`` of the gated product to [..., group_size]
  (any leading shape, e.g. ``view(-1, group_size)``), or none (one group of D);
- the normalisation: ``v * rsqrt(mean(v²) + eps)`` with ``v²`` as ``pow(2)``, ``v * v`` or
  ``square``, the mean as ``mean(-1, keepdim=True)`` or ``sum(-1, keepdim=True) / n``, the inverse
  root as ``rsqrt``, ``pow(-0.5)`` or ``1 / sqrt``, or ``v / sqrt(...)``; or ``F.rms_norm(v, (n,))``;
- then the reshape back to [..., D], casts, and the multiply by a [D] weight (either order, before
  or after the casts).

The op computes in fp32 and rounds once, to the dtype of the last node it replaces: casts between
the normalisation and the weight (e.g. Nemotron's ``.to(dtype)`` before ``weight *``) do not round
there any more (the fused kernels, mamba-ssm's included, never did). Narrowing casts of x or the
gate before the product stay in the graph (the op reads the rounded values, as eager does).

Constraints (else the site is left alone): x, gate and the product have one shape (no
broadcasting), the groups tile the last dim, eps is a constant, the weight is [D].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from dsgraph.fxutil import call, scalar, val
from dsgraph.pipeline import Pass, PassContext

aten = torch.ops.aten
dsgraph_ops = torch.ops.dsgraph

RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unflatten.int,
            aten.flatten.using_ints}
CAST_OPS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.to.dtype_layout}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _is_cast(node) -> bool:
    """A cast between float dtypes (values kept on the same device)."""
    if not _is(node, *CAST_OPS):
        return False
    src, dst = val(node.args[0]), val(node)
    return isinstance(src, torch.Tensor) and src.dtype in _FLOATS and dst.dtype in _FLOATS and src.device == dst.device


def _widening(node) -> bool:
    return _is_cast(node) and torch.promote_types(val(node.args[0]).dtype, val(node).dtype) == val(node).dtype


def _source(node):
    """``node`` with widening casts (which change no value) stripped."""
    while _widening(node):
        node = node.args[0]
    return node


def _operands(node):
    """Both orders of a binary node's first two args."""
    a, b = node.args[:2]
    return ((a, b), (b, a))


class GatedNormPass(Pass):
    name = "gated_norm"
    provides = ("gated_rmsnorm",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        constants: dict = {}
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op != "call_function":
                continue
            found = _normalised(node, gm, constants)
            if found is not None:
                _Site(gm, ctx, node, *found).rewrite()


def _last_dim(node: fx.Node, dims) -> bool:
    rank = val(node).dim()
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % rank == rank - 1


def _mean_square(node, gm, constants) -> Optional[fx.Node]:
    """v if ``node`` is mean(v², -1, keepdim=True) in one of its spellings, else None."""
    if _is(node, aten.mean.dim) and _last_dim(node.args[0], node.args[1]) and \
            (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)):
        sq = node.args[0]
    elif _is(node, aten.div.Tensor, aten.mul.Tensor) and _is(node.args[0], aten.sum.dim_IntList):
        total = node.args[0]
        sq = total.args[0]
        n = scalar(node.args[1], gm, constants)
        keepdim = total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim", False)
        if n is None or not keepdim or not _last_dim(sq, total.args[1]):
            return None
        count = val(sq).shape[-1]
        if not (n == count if node.target is aten.div.Tensor else n * count == 1.0):
            return None
    else:
        return None
    if _is(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2:
        return _source(sq.args[0])
    if _is(sq, aten.square.default):
        return _source(sq.args[0])
    if _is(sq, aten.mul.Tensor) and sq.args[0] is sq.args[1]:
        return _source(sq.args[0])
    return None


def _plus_eps(node, gm, constants) -> Optional[tuple[fx.Node, float]]:
    """(v, eps) if ``node`` is mean(v²) + eps."""
    if not _is(node, aten.add.Tensor, aten.add.Scalar) or node.kwargs.get("alpha", 1) != 1:
        return None
    for a, b in _operands(node):
        eps = scalar(b, gm, constants)
        v = _mean_square(a, gm, constants) if isinstance(a, fx.Node) and eps is not None else None
        if v is not None and eps >= 0:
            return v, eps
    return None


def _inverse_root(node, gm, constants) -> Optional[tuple[fx.Node, float]]:
    """(v, eps) if ``node`` is 1 / sqrt(mean(v²) + eps)."""
    if _is(node, aten.mul.Tensor) and scalar(node.args[1], gm, constants) == 1.0:  # 1 / t traces to (1/t) * 1
        node = node.args[0]
    if _is(node, aten.rsqrt.default) or (_is(node, aten.pow.Tensor_Scalar) and node.args[1] == -0.5):
        return _plus_eps(node.args[0], gm, constants)
    if _is(node, aten.reciprocal.default) and _is(node.args[0], aten.sqrt.default):
        return _plus_eps(node.args[0].args[0], gm, constants)
    return None


def _normalised(node, gm, constants) -> Optional[tuple[fx.Node, float]]:
    """(v, eps) if ``node`` is v · rsqrt(mean(v²) + eps) over v's last dim, in any spelling."""
    if _is(node, aten.rms_norm.default):
        shape, weight = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
        if weight is None and eps is not None and list(shape) == [val(node).shape[-1]]:
            return _source(node.args[0]), float(eps)
        return None
    if _is(node, aten.mul.Tensor):
        for a, b in _operands(node):
            found = _inverse_root(b, gm, constants) if isinstance(b, fx.Node) else None
            if found is not None and _source(a) is found[0]:
                return found
    if _is(node, aten.div.Tensor) and _is(node.args[1], aten.sqrt.default):
        found = _plus_eps(node.args[1].args[0], gm, constants)
        if found is not None and _source(node.args[0]) is found[0]:
            return found
    return None


def _silu_input(node) -> Optional[fx.Node]:
    """g if ``node`` is silu(g) or g · sigmoid(g)."""
    if _is(node, aten.silu.default):
        return node.args[0]
    if _is(node, aten.mul.Tensor):
        for a, b in _operands(node):
            if _is(b, aten.sigmoid.default) and b.args[0] is a:
                return a
    return None


class _Site:
    def __init__(self, gm: fx.GraphModule, ctx: PassContext, normed: fx.Node, v: fx.Node, eps: float):
        self.gm, self.ctx, self.normed, self.v, self.eps = gm, ctx, normed, v, eps

    def rewrite(self) -> None:
        gated = self.v
        while _is(gated, *RESHAPES) or _widening(gated):
            gated = gated.args[0]
        product = _source(gated)
        if not _is(product, aten.mul.Tensor):
            return  # an RMSNorm without a gate: not this pass's site
        for a, b in _operands(product):
            gate = _silu_input(b) if isinstance(b, fx.Node) else None
            if gate is not None and isinstance(a, fx.Node):
                x = _source(a)
                break
        else:
            return
        gate = _source(gate)
        shape = list(val(product).shape)
        if not shape or list(val(x).shape) != shape or list(val(gate).shape) != shape:
            self.ctx.skip(self.normed, f"gated RMSNorm of x {list(val(x).shape)} and gate {list(val(gate).shape)} "
                                       f"broadcast to {shape}: the op takes one shape")
            return
        d, group = shape[-1], val(self.v).shape[-1]
        if d % group or val(self.v).numel() != val(product).numel():
            return  # the normalised rows are not groups of the gated rows' channels
        end, weight = self._output(d, shape)
        if end is None:
            return
        out_dtype = val(end).dtype
        args = dict(x=val(x), gate=val(gate), weight=val(weight), eps=self.eps, group_size=group, out_dtype=out_dtype)
        if any(t.dtype not in _FLOATS for t in (val(x), val(gate), val(weight))):
            self.ctx.skip(end, f"gated RMSNorm dtypes outside {_FLOATS}")
            return
        backend, rejected = self.ctx.choose("gated_rmsnorm", end, **args)
        if backend is None:
            return
        with self.gm.graph.inserting_before(end):
            new = call(self.gm.graph, dsgraph_ops.gated_rmsnorm.default, x, gate, weight, self.eps, group,
                       out_dtype, backend, like=end)
        rows = val(x).numel() // d
        detail = (f"{d // group} group(s) of {group} on {rows} row(s), {val(x).dtype} -> {out_dtype}, "
                  f"eps {self.eps:g}")
        self.ctx.commit(self.gm, op="gated_rmsnorm", old=end, new=new, inputs=[x, gate, weight], backend=backend,
                        rejected=rejected, detail=detail)

    def _output(self, d: int, shape: list) -> tuple[Optional[fx.Node], Optional[fx.Node]]:
        """(last node, weight): walk the single-user chain after the normalisation through reshapes,
        casts and the weight multiply; the last node with the weight applied and the gated shape
        is what the op replaces."""
        node, weight, end = self.normed, None, None
        while True:
            if weight is not None and list(val(node).shape) == shape:
                end = node
            if len(node.users) != 1:
                break
            user = next(iter(node.users))
            if _is(user, *RESHAPES) or _is_cast(user):
                node = user
                continue
            if weight is None and _is(user, aten.mul.Tensor) and list(val(node).shape) == shape:
                other = user.args[1] if user.args[0] is node else user.args[0]
                other = _source(other) if isinstance(other, fx.Node) else None
                if other is not None and list(val(other).shape) == [d] and list(val(user).shape) == shape:
                    weight, node = other, user
                    continue
            break
        return end, weight
