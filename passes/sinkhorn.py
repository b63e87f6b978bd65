"""Sinkhorn normalisation loops -> ``dsgraph::sinkhorn``.

Recognises DeepSeek V4's Hyper-Connection Sinkhorn (``models/deepseek_v4.py:sinkhorn_normalize``) as
eager code writes it, the loop unrolled by the trace:
- the start: ``softmax(logits, -1) + eps`` (eps a constant, either operand order; no ``+ eps`` is
  eps = 0), the logits through widening casts (``.float()`` of bf16, ``softmax(..., dtype=)``: the
  op reads the narrow logits and widens them itself);
- then normalisation steps ``c / (c.sum(d, keepdim=True) + eps)`` with d the row dim (-1) or the
  column dim (-2), written negative or positive, as a division or a product with the reciprocal
  (``1 / t``, ``t.reciprocal()``, ``t.pow(-1)``).

The pass walks the chain from the softmax step by step and counts the iterations (column
normalisations). Chains that start with the column step are DeepSeek's form; chains that start with
a row step are the op's ``row_first`` form (the softmax's rows normalised once more, with the eps).
A chain that ends with a row step is rewritten up to its last column step; the row step stays in
the graph, reading the op's result.

Left alone, with the reason in the report: a chain whose steps use different eps (or a negative
one), one whose intermediate iterates (or their sums and divisors) are also used elsewhere (the
eager chain would stay alive beside the op), one whose steps do not alternate between rows and
columns, non-square matrices, and chains computed in fp16/bf16 (the op computes in fp32; eager
rounds every step).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from dsgraph.fxutil import call, scalar, val
from dsgraph.ops.sinkhorn import DTYPES, result_dtype
from dsgraph.pipeline import Pass, PassContext

aten = torch.ops.aten
dsgraph_ops = torch.ops.dsgraph

_CASTS = (aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.to.dtype_layout)
_CHAIN_DTYPES = (torch.float32, torch.float64)


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _operands(node: fx.Node):
    """Both orders of a binary node's first two args."""
    a, b = node.args[:2]
    return ((a, b), (b, a))


@dataclasses.dataclass
class _Step:
    """One normalisation ``out = c / (c.sum(axis, keepdim=True) + eps)``."""
    axis: str  # "row" (sum over -1) or "col" (sum over -2)
    eps: float
    out: fx.Node
    inner: list  # the sum, divisor and reciprocal nodes: used by this step only, or the chain is shared


class SinkhornPass(Pass):
    name = "sinkhorn"
    provides = ("sinkhorn",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        constants: dict = {}
        for node in list(gm.graph.nodes):
            if node.graph is gm.graph and _is(node, aten.softmax.int) and _last_dim(node, node.args[1]):
                _Site(gm, ctx, node, constants).rewrite()


def _last_dim(node: fx.Node, dim) -> bool:
    rank = val(node).dim()
    return rank >= 2 and isinstance(dim, int) and dim % rank == rank - 1


def _sum_axis(node: fx.Node, c: fx.Node) -> Optional[str]:
    """"row" / "col" if ``node`` is ``c.sum(-1 / -2, keepdim=True)``."""
    if not _is(node, aten.sum.dim_IntList) or node.args[0] is not c or node.kwargs.get("dtype") is not None:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    rank = val(c).dim()
    if not keepdim or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return None
    return {rank - 1: "row", rank - 2: "col"}.get(dims[0] % rank)


def _refusal(start: torch.Tensor, steps: list, eps0: float) -> str:
    """Why a chain of normalisations is not the op's (empty when it is)."""
    axes = [s.axis for s in steps]
    epss = [s.eps for s in steps]
    if start.shape[-1] != start.shape[-2]:
        return f"Sinkhorn on non-square [{start.shape[-2]}, {start.shape[-1]}] matrices: the op takes [..., M, M]"
    if start.dtype not in _CHAIN_DTYPES:
        return f"Sinkhorn computed in {start.dtype}: eager rounds every step, the op computes in fp32 and rounds once"
    if any(a == b for a, b in zip(axes, axes[1:])):
        order = "".join("R" if a == "row" else "C" for a in axes)
        return f"the normalisations do not alternate between rows (R) and columns (C): {order}"
    if any(e != eps0 for e in epss) or eps0 < 0:
        values = ", ".join(f"{e:g}" for e in dict.fromkeys(epss))
        return f"eps must be one value >= 0 in every step: {eps0:g} after the softmax, {values} in the normalisations"
    if axes == ["row"]:
        return "a row normalisation of softmax + eps alone (no column normalisation)"
    return ""


class _Site:
    def __init__(self, gm: fx.GraphModule, ctx: PassContext, softmax: fx.Node, constants: dict):
        self.gm, self.ctx, self.softmax, self.constants = gm, ctx, softmax, constants

    def _plus_eps(self, node: fx.Node) -> Optional[tuple[fx.Node, float]]:
        """(t, eps) if ``node`` is t + eps with eps a constant."""
        if not _is(node, aten.add.Tensor, aten.add.Scalar) or node.kwargs.get("alpha", 1) != 1:
            return None
        for a, b in _operands(node):
            eps = scalar(b, self.gm, self.constants)
            if isinstance(a, fx.Node) and eps is not None and val(a).shape == val(node).shape:
                return a, eps
        return None

    def _step(self, c: fx.Node) -> Optional[_Step]:
        """The normalisation step reading ``c``, if one does."""
        for total in c.users:
            axis = _sum_axis(total, c)
            if axis is None:
                continue
            divisors = [(total, 0.0, [total])]
            for user in total.users:
                found = self._plus_eps(user)
                if found is not None and found[0] is total:
                    divisors.append((user, found[1], [total, user]))
            for divisor, eps, inner in divisors:
                out = self._applied(c, divisor, inner)
                if out is not None:
                    return _Step(axis, eps, out, inner)
        return None

    def _applied(self, c: fx.Node, divisor: fx.Node, inner: list) -> Optional[fx.Node]:
        """The node computing c / divisor (a division, or a product with its reciprocal); appends the
        reciprocal's nodes to ``inner``."""
        for user in divisor.users:
            if _is(user, aten.div.Tensor) and user.args[0] is c and user.args[1] is divisor:
                return user
        for r in divisor.users:
            if not (_is(r, aten.reciprocal.default) or (_is(r, aten.pow.Tensor_Scalar) and r.args[1] == -1)):
                continue
            chain = [r]
            # ``1 / t`` traces to reciprocal(t) * 1
            if len(r.users) == 1:
                one = next(iter(r.users))
                if _is(one, aten.mul.Tensor) and one.args[0] is r and scalar(one.args[1], self.gm,
                                                                              self.constants) == 1.0:
                    chain.append(one)
            for user in chain[-1].users:
                if _is(user, aten.mul.Tensor) and any(a is c and b is chain[-1] for a, b in _operands(user)):
                    inner.extend(chain)
                    return user
        return None

    def rewrite(self) -> None:
        start, eps0 = self.softmax, 0.0
        for user in self.softmax.users:
            found = self._plus_eps(user)
            if found is not None and found[0] is self.softmax:
                start, eps0 = user, found[1]
                break
        steps, c = [], start
        while (step := self._step(c)) is not None:
            steps.append(step)
            c = step.out
        if not steps:
            return  # a softmax, not a Sinkhorn
        trailing = steps[-1].axis == "row"
        kept = steps[:-1] if trailing else steps
        reason = _refusal(val(start), steps, eps0) or self._shared(start, kept)
        if reason:
            self.ctx.skip(steps[-1].out, reason)
            return
        self._replace(kept[-1].out, kept[0].axis == "row", sum(s.axis == "col" for s in kept), eps0,
                      list(val(start).shape), trailing)

    @staticmethod
    def _shared(start: fx.Node, steps: list) -> str:
        """Why not, when values inside the chain have users outside it (empty when none do)."""
        names = {start: "the softmax" if _is(start, aten.softmax.int) else "softmax + eps"}
        for k, s in enumerate(steps, 1):
            names.update({n: f"the sum or divisor of normalisation {k}" for n in s.inner})
            if k < len(steps):
                names[s.out] = f"the iterate after normalisation {k}"
        inside = set(names) | {steps[-1].out}
        shared = dict.fromkeys(desc for n, desc in names.items() if any(u not in inside for u in n.users))
        return (f"intermediate values of the Sinkhorn chain are used elsewhere ({', '.join(shared)}): the eager "
                "chain would stay beside the op") if shared else ""

    def _logits(self, dtype: torch.dtype) -> fx.Node:
        """The softmax's input with widening casts stripped while the op, reading it, still computes
        in ``dtype`` (the chain's)."""
        node = self.softmax.args[0]
        while _is(node, *_CASTS) and isinstance(node.args[0], fx.Node):
            src, dst = val(node.args[0]), val(node)
            if src.dtype not in DTYPES or src.device != dst.device or \
                    torch.promote_types(src.dtype, dst.dtype) != dst.dtype or result_dtype(src.dtype) != dtype:
                break
            node = node.args[0]
        return node

    def _replace(self, end: fx.Node, row_first: bool, iters: int, eps: float, shape: list, trailing: bool) -> None:
        graph = self.gm.graph
        logits = self._logits(val(end).dtype)
        with graph.inserting_before(end):
            if result_dtype(val(logits).dtype) != val(end).dtype:
                # e.g. softmax(fp32 logits, dtype=float64): the op reads the logits in the chain's dtype
                logits = call(graph, aten._to_copy.default, logits, dtype=val(end).dtype, like=end)
            args = dict(logits=val(logits), iters=iters, eps=eps, row_first=row_first)
            backend, rejected = self.ctx.choose("sinkhorn", end, **args)
            if backend is None:
                return
            new = call(graph, dsgraph_ops.sinkhorn.default, logits, iters, eps, backend, row_first, like=end)
        m = shape[-1]
        detail = (f"{iters} iteration(s){' (row first)' if row_first else ''} on {val(end).numel() // (m * m)} "
                  f"[{m}, {m}] matrices, eps {eps:g}, {val(logits).dtype} logits"
                  + ("; the trailing row normalisation stays in the graph" if trailing else ""))
        self.ctx.commit(self.gm, op="sinkhorn", old=end, new=new, inputs=[logits], backend=backend,
                        rejected=rejected, detail=detail)
