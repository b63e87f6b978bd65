"""Softmax-weighted window pooling (DeepSeek V4's Compressor) -> ``dsgraph::window_pool``.

Recognises ``(kv * score.softmax(dim=2)).sum(dim=2)`` over [B, P, slots, f] windows (dims written
negative or positive, the product in either order) as ``models/deepseek_v4.py``'s Compressor writes it:
- plain: kv and score are [B, P, r, w] (``unflatten``/``view``/``reshape`` of [B, P·r, w] projections,
  any ratio r; an incomplete trailing window dropped by slicing the tokens before the projections);
- overlap: kv and score are ``overlap_transform`` buffers: ``new_full([B, P, 2r, d], fill)`` written by
  two slice assignments, ``buf[:, :, r:] = t[..., d:]`` and ``buf[:, 1:, :r] = t[:, :-1, :, :d]``,
  of [B, P, r, 2d] sources (in the traced graph: ``copy_`` into slices), kv filled with 0 and score
  with -inf;
- ``score = projection + ape`` with ape broadcast over B and P (any shape that broadcasts to [r, w]
  there) folds into the op; widening casts (``.float()``) of kv, score and ape are read by the op. A
  broadcast fp16/bf16 ape enters the op as fp32 (its gradient is reduced over the rows before rounding).

The op reads the unpooled [B, N, w] projections once: the [B, P, 2r, d] buffers, the softmax and the
product are never materialised. It computes in fp32 and rounds once to the sum's dtype: a chain that
eager computes in bf16/fp16 (the add, softmax or product rounded) is computed more accurately.

Left alone, with the reason in the report: kv and score of different window shapes (broadcast
products), windows written in place other than by the overlap pattern (other fills, other slices,
one of kv / score overlapped and not the other), softmax weights or products also used elsewhere
(the eager chain would stay beside the op), dtypes outside fp16/bf16/fp32/fp64.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from dsgraph.fxutil import VIEW_OPS, call, scalar, val, written
from dsgraph.ops.window_pool import DTYPES
from dsgraph.pipeline import Pass, PassContext

aten = torch.ops.aten
dsgraph_ops = torch.ops.dsgraph

_CASTS = (aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.to.dtype_layout)
_UNFLATTENS = (aten.unflatten.int, aten.view.default, aten.reshape.default, aten._unsafe_view.default)


class Reject(Exception):
    """A recognised site the op cannot take; the message is the report's reason."""


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _widened(node):
    """``node`` with widening float casts (which change no value) stripped."""
    while _is(node, *_CASTS) and isinstance(node.args[0], fx.Node):
        src, dst = val(node.args[0]), val(node)
        if not (src.dtype in DTYPES and dst.dtype in DTYPES and src.device == dst.device
                and torch.promote_types(src.dtype, dst.dtype) == dst.dtype):
            break
        node = node.args[0]
    return node


def _dims(node: fx.Node, rank: int) -> Optional[int]:
    """The one dim of a ``sum(t, [d])`` without keepdim, normalised."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if keepdim or node.kwargs.get("dtype") is not None or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return None
    return dims[0] % rank


def _region(node: fx.Node) -> tuple[fx.Node, list, list]:
    """(base, [(lo, hi)] per dim of base, the slice nodes) of a chain of step-1 slices of base."""
    chain = []
    while _is(node, aten.slice.Tensor):
        chain.append(node)
        node = node.args[0]
    shape = list(val(node).shape)
    bounds = [[0, n] for n in shape]
    for s in reversed(chain):  # outermost last
        dim, start, end, step = (list(s.args[1:]) + [0, None, None, 1][len(s.args) - 1:])[:4]
        if step != 1:
            raise Reject(f"a strided slice (step {step}) in the overlap assignment")
        dim %= len(shape)
        lo, hi = bounds[dim]
        size = hi - lo
        start = 0 if start is None else (start + size if start < 0 else start)
        end = size if end is None else (end + size if end < 0 else end)
        start, end = max(0, min(start, size)), max(0, min(end, size))
        bounds[dim] = [lo + start, lo + max(start, end)]
    return node, [tuple(b) for b in bounds], chain


class PoolingPass(Pass):
    name = "pooling"
    provides = ("window_pool",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        constants: dict = {}
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or not _is(node, aten.softmax.int):
                continue
            site = _Site.find(gm, ctx, node, constants)
            if site is None:
                continue
            try:
                site.rewrite()
            except Reject as exc:
                ctx.skip(site.total, str(exc))


class _Site:
    def __init__(self, gm, ctx, softmax, product, total, kv4, constants):
        self.gm, self.ctx, self.softmax, self.product, self.total = gm, ctx, softmax, product, total
        self.kv4, self.constants = kv4, constants

    @classmethod
    def find(cls, gm, ctx, softmax, constants) -> Optional["_Site"]:
        """The site whose softmax is ``softmax``: ``(kv * softmax(s, 2)).sum(2)`` of rank-4 windows."""
        rank = val(softmax).dim()
        if rank != 4 or softmax.args[1] % rank != 2 or len(softmax.args) > 2 and softmax.args[2] is not None:
            return None
        for product in softmax.users:
            if not _is(product, aten.mul.Tensor):
                continue
            a, b = product.args[:2]
            kv4 = b if a is softmax else a
            if not isinstance(kv4, fx.Node) or kv4 is softmax:
                continue
            for total in product.users:
                if _is(total, aten.sum.dim_IntList) and _dims(total, val(product).dim()) == 2:
                    return cls(gm, ctx, softmax, product, total, kv4, constants)
        return None

    # --- overlap buffers ----------------------------------------------------------------------------
    def _overlap_source(self, buf: fx.Node, fill: float, what: str) -> tuple[fx.Node, list]:
        """The [B, P, r, 2d] source of an ``overlap_transform`` buffer and its two slice assignments
        (``copy_`` nodes), if it is one."""
        if not _is(buf, aten.new_full.default, aten.full.default):
            raise Reject(f"{what} windows are written in place but are not a new_full/full buffer")
        value = scalar(buf.args[1] if buf.target is aten.full.default else buf.args[2], self.gm, self.constants)
        if value != fill:
            raise Reject(f"{what}'s overlap buffer is filled with {value}: the op fills window 0's missing slots "
                         "with kv 0 and score -inf")
        B, P, slots, d = val(buf).shape
        copies, stack = [], [buf]
        while stack:
            node = stack.pop()
            for user in node.users:
                if _is(user, aten.copy_.default) and user.args[0] is node:
                    copies.append(user)
                elif _is(user, aten.slice.Tensor) and user.args[0] is node:
                    stack.append(user)
                elif node is not buf or _is(user, *VIEW_OPS) or getattr(user.target, "_schema", None) is not None \
                        and user.target._schema.is_mutable:
                    raise Reject(f"{what}'s overlap buffer is viewed or written other than by slice assignments")
        if len(copies) != 2 or slots % 2:
            raise Reject(f"{what}'s overlap buffer has {len(copies)} slice assignment(s), the overlap pattern two")
        r = slots // 2
        want = {((0, B), (0, P), (r, 2 * r), (0, d)): ((0, B), (0, P), (0, r), (d, 2 * d)),
                ((0, B), (1, P), (0, r), (0, d)): ((0, B), (0, P - 1), (0, r), (0, d))}
        sources, dsts = set(), set()
        for copy in copies:
            dst = tuple(_region(copy.args[0])[1])
            src, region, _ = _region(copy.args[1])
            if dst not in want or dst in dsts:
                raise Reject(f"{what}'s overlap buffer is assigned slots {list(dst)}, not the overlap pattern's")
            if tuple(val(src).shape) != (B, P, r, 2 * d) or tuple(region) != want[dst]:
                raise Reject(f"{what}'s overlap slots {list(dst)} read {list(region)} of a "
                             f"{list(val(src).shape)} tensor, expected {list(want[dst])} of [B, P, r, 2d]")
            sources.add(src)
            dsts.add(dst)
        if len(sources) != 1:
            raise Reject(f"{what}'s overlap slots come from different tensors")
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        last = max(order[c] for c in copies)
        if any(order[u] < last for u in buf.users if not _is(u, aten.slice.Tensor)):
            raise Reject(f"{what}'s overlap buffer is read before its slice assignments are done")
        return sources.pop(), sorted(copies, key=order.__getitem__)

    def _functionalize(self, buf: fx.Node, copies: list) -> None:
        """Replace the buffer's slice assignments by slice_scatters its readers read, so the chain the
        op replaces is pure (verify can run it, dead-code elimination drops it)."""
        graph = self.gm.graph
        readers = [u for u in buf.users if not _is(u, aten.slice.Tensor)]
        with graph.inserting_before(copies[-1].next):
            out = buf
            for copy in copies:
                out = self._scatter(graph, out, list(reversed(_region(copy.args[0])[2])), copy.args[1])
        for reader in readers:
            reader.replace_input_with(buf, out)
        for copy in copies:
            view = copy.args[0]
            graph.erase_node(copy)
            while _is(view, aten.slice.Tensor) and not view.users:
                parent = view.args[0]
                graph.erase_node(view)
                view = parent

    def _scatter(self, graph, base, chain, src):
        """``base`` with ``src`` written at the region of the slices ``chain`` (outermost first)."""
        if not chain:
            return src
        dim, start, end = (list(chain[0].args[1:]) + [0, None, None])[:3]
        inner = call(graph, aten.slice.Tensor, base, dim, start, end, like=self.total)
        return call(graph, aten.slice_scatter.default, base, self._scatter(graph, inner, chain[1:], src), dim,
                    start, end, like=self.total)

    # --- the projections ----------------------------------------------------------------------------
    def _flat(self, node: fx.Node) -> fx.Node:
        """[B, P, r, w] windows -> [B, P·r, w] tokens: the tensor they were unflattened from, else a
        reshape; a tokens slice [:, :P·r] of [B, S, w] with S // r == P is read whole (the op drops
        the incomplete window itself)."""
        B, P, r, w = val(node).shape
        src = node.args[0] if _is(node, *_UNFLATTENS) else None
        if isinstance(src, fx.Node) and tuple(val(src).shape) == (B, P * r, w):
            base, region, chain = _region(src)
            if len(chain) == 1 and val(base).dim() == 3 and region[1][0] == 0 and val(base).shape[1] // r == P \
                    and tuple(region[0]) == (0, B) and tuple(region[2]) == (0, w):
                return base
            return src
        with self.gm.graph.inserting_before(self.total):
            return call(self.gm.graph, aten.reshape.default, node, [B, P * r, w], like=self.total)

    def _ape(self, s4: fx.Node) -> tuple[fx.Node, Optional[fx.Node]]:
        """(score, ape) of ``score + ape`` with ape broadcast over B and P; (s4, None) otherwise."""
        if not _is(s4, aten.add.Tensor) or s4.kwargs.get("alpha", 1) != 1:
            return s4, None
        shape = tuple(val(s4).shape)
        for a, b in (s4.args[:2], s4.args[1::-1]):
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or tuple(val(a).shape) != shape:
                continue
            ape = tuple(val(b).shape)
            if len(ape) <= 2 or all(n == 1 for n in ape[:-2]):
                return a, b
        return s4, None

    def _ape_rw(self, ape: fx.Node, r: int, w: int) -> fx.Node:
        shape = tuple(val(ape).shape)
        graph = self.gm.graph
        with graph.inserting_before(self.total):
            if len(shape) > 2:
                ape = call(graph, aten.reshape.default, ape, list(shape[-2:]), like=self.total)
            if tuple(val(ape).shape) != (r, w):
                if val(ape).element_size() < 4:
                    # the op's dape is [r, w]: summed over the broadcast rows in fp16/bf16 it would round r
                    # times where eager's reduction rounds once; in fp32 the cast's backward rounds once
                    ape = call(graph, aten._to_copy.default, ape, dtype=torch.float32, like=self.total)
                ape = call(graph, aten.expand.default, ape, [r, w], like=self.total)
        return ape

    # --- the rewrite --------------------------------------------------------------------------------
    def rewrite(self) -> None:
        s4 = _widened(self.softmax.args[0])
        kv4 = _widened(self.kv4)
        if tuple(val(kv4).shape) != tuple(val(s4).shape):
            raise Reject(f"kv windows {list(val(kv4).shape)} and score windows {list(val(s4).shape)} differ "
                         "(a broadcast product)")
        shared = [name for name, node, inside in (("the softmax weights", self.softmax, {self.product}),
                                                  ("the weighted windows", self.product, {self.total}))
                  if set(node.users) - inside]
        if shared:
            raise Reject(f"{' and '.join(shared)} are also used elsewhere: the eager chain would stay beside the op")
        for what, t in (("kv", kv4), ("score", s4)):
            if val(t).dtype not in DTYPES:
                raise Reject(f"{what} dtype {val(t).dtype} (the op takes fp16, bf16, fp32, fp64)")
        kv_written, s_written = written(kv4), written(s4)
        overlap = kv_written or s_written
        if overlap:
            if not (kv_written and s_written):
                raise Reject(f"only {'kv' if kv_written else 'score'} is written in place (an overlap buffer); "
                             "the op overlaps both or neither")
            (kv_src, kv_copies), (s_src, s_copies) = (self._overlap_source(kv4, 0.0, "kv"),
                                                      self._overlap_source(s4, float("-inf"), "score"))
            self._functionalize(kv4, kv_copies)
            self._functionalize(s4, s_copies)
            kv_windows = _widened(kv_src)
            score4, ape = self._ape(_widened(s_src))
        else:
            kv_windows = kv4
            score4, ape = self._ape(s4)
        score4 = _widened(score4)
        ape = _widened(ape) if ape is not None else None
        B, P, r, w = val(kv_windows).shape
        if tuple(val(score4).shape) != (B, P, r, w):
            raise Reject(f"score windows {list(val(score4).shape)} and kv windows {[B, P, r, w]} differ")
        if ape is not None and val(ape).dtype not in DTYPES:
            ape = None
        kv3, score3 = self._flat(kv_windows), self._flat(score4)
        ape2 = self._ape_rw(ape, r, w) if ape is not None else None
        out_dtype = val(self.total).dtype
        args = dict(kv=val(kv3), score=val(score3), ape=None if ape2 is None else val(ape2), ratio=r,
                    overlap=overlap, out_dtype=out_dtype)
        backend, rejected = self.ctx.choose("window_pool", self.total, **args)
        if backend is None:
            return
        with self.gm.graph.inserting_before(self.total):
            new = call(self.gm.graph, dsgraph_ops.window_pool.default, kv3, score3, ape2, r, overlap, out_dtype,
                       backend, like=self.total)
        N = val(kv3).shape[1]
        detail = (f"{'overlapping ' if overlap else ''}windows of {r} tokens: {N} tokens -> {P} pooled x "
                  f"{w // 2 if overlap else w} (batch {B}), ape {list(val(ape).shape) if ape is not None else 'none'}, "
                  f"kv {val(kv3).dtype}, score {val(score3).dtype} -> {out_dtype}")
        inputs = [kv3, score3] + ([ape2] if ape2 is not None else [])
        self.ctx.commit(self.gm, op="window_pool", old=self.total, new=new, inputs=inputs, backend=backend,
                        rejected=rejected, detail=detail)
