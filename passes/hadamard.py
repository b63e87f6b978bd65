"""Hadamard rotations -> ``dsgraph::hadamard``.

Recognises ``scale * x H_n`` over the last dim however eager code writes it: the butterfly of strided
slices and cats (``hadamard_transform_torch``), recursive halvings (``view(..., 2, n/2)``/``unbind``/
``chunk`` with ``cat``/``stack`` of sums and differences, either ordering), or a product with a
constant matrix (``x @ H``, ``matmul``, ``mm``, ``F.linear``); the scale anywhere (a multiply or
divide before, between or after the rounds, or folded into the matrix) and casts around it.

How: every maximal subgraph of *row-linear* ops (views, slices, casts, cat/stack, add/sub, negation,
multiplication by a constant scalar, products with a constant matrix) fed by one tensor ``src`` is
interpreted on coefficients: a value of shape [L..., T...] (L = src's leading dims, never touched)
is held as ``C [T..., n]``, each element a combination of its row of ``src`` [L..., n]. A node is
rewritten only when its coefficients, flattened to [n, n], equal ``c * kron(I, H_d)`` exactly (in
float64) — the transform over contiguous blocks of d — AND the eager code itself exposed those
blocks: ``src`` or a reshape/cast of it (before any arithmetic) has last dim d. So a wrong sign
pattern, a non-power-of-2, an affine term, a partial butterfly (blocks the code never formed), or
anything mixing rows never matches. The scale ``c`` is read off the coefficients.

Rows longer than ``MAX_ROW`` (n x n coefficients would not fit) are checked on ``PROBES`` random
integer vectors instead of the basis: the coefficients become [T..., PROBES] (the region applied to
each probe, exact integer sums in float64 up to the scalings), compared with c * kron(I, H_d) applied
to the probes within float64 rounding. A linear map other than that agrees on every probe only with
negligible probability (each probe catches a wrong row with probability >= 1 - 2^-11).

Constraints (a site outside them is left alone): the rotated row (``src``'s last dim) has at most
``MAX_PROBED_ROW`` elements (larger sites that look like a butterfly or a constant product are listed
as skipped); d >= 2; a floating result; constant
matrices must be compile-time constants (a parameter is not); no ``detach`` inside (it changes
gradients); the transform is on the last dim (``H x`` along another dim is not recognised).
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Optional, Union

import torch
import torch.fx as fx
from torch import Tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily

from dsgraph.fxutil import call, evaluate, is_constant, scalar, val, written
from dsgraph.pipeline import Pass, PassContext

aten = torch.ops.aten

MAX_ROW = 1 << 12  # 4096: the n x n float64 coefficients of one site are 128 MiB at most
MAX_PROBED_ROW = 1 << 15  # dsgraph::hadamard's limit
PROBES = 64
# Entries reach n * 2^10 * scale; float64 rounding of the scalings stays below 1e-16 of that, while a
# wrong coefficient shifts some probe by a multiple of scale / n at least.
_PROBE_ATOL = 1e-12 * (1 << 10)

CASTS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.to.dtype_layout,
         aten.clone.default, aten.contiguous.default, aten.alias.default}
RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
            aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
            aten.unflatten.int}
SPLITS = {aten.split.Tensor: torch.split, aten.split_with_sizes.default: torch.split,
          aten.chunk.default: torch.chunk}
PRODUCTS = {aten.matmul.default, aten.mm.default, aten.linear.default}


class _NotLinear(Exception):
    """The node is not a row-linear function of one source: it starts a region of its own."""


@dataclasses.dataclass
class _Rep:
    src: fx.Node
    coeff: Union[Tensor, tuple]  # [T..., n] (a tuple for split ops)
    ops: frozenset  # the mixing ops upstream in the region: "add", "sub", "matmul"


class HadamardPass(Pass):
    name = "hadamard"
    provides = ("hadamard",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        with unset_fake_temporarily():
            reps = self._regions(gm)
            by_src: dict[fx.Node, list[fx.Node]] = {}
            for node, rep in reps.items():
                if node is not rep.src:
                    by_src.setdefault(rep.src, []).append(node)
            for src, nodes in by_src.items():
                if any(reps[n].ops for n in nodes):
                    self._rewrite_region(gm, ctx, src, nodes, reps)

    # --- phase 1: regions, on meta coefficients (shapes only) ---------------------------------------
    def _regions(self, gm: fx.GraphModule) -> dict[fx.Node, _Rep]:
        reps: dict[fx.Node, _Rep] = {}
        constants: dict = {}
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "get_attr", "call_function") and not written(node):
                rep = None
                if node.op == "call_function":
                    try:
                        rep = self._propagate(gm, node, reps, constants, meta=True)
                    except _NotLinear:
                        rep = None
                v = val(node)
                if rep is None and isinstance(v, Tensor) and v.dim() >= 1 and v.shape[-1] >= 1:
                    rep = _Rep(node, torch.empty(v.shape[-1], v.shape[-1], device="meta"), frozenset())
                if rep is not None:
                    reps[node] = rep
        return reps

    def _propagate(self, gm, node: fx.Node, reps: dict, constants: dict, meta: bool) -> _Rep:
        """The coefficients of ``node`` from those of its region operands (raises :class:`_NotLinear`)."""
        found: list[_Rep] = []

        def get(arg) -> Union[Tensor, tuple]:
            rep = reps.get(arg) if isinstance(arg, fx.Node) else None
            if rep is None or rep.coeff is None or (found and rep.src is not found[0].src):
                raise _NotLinear
            found.append(rep)
            return rep.coeff

        def const_matrix(arg) -> Tensor:
            if not (isinstance(arg, fx.Node) and is_constant(arg, constants) and val(arg).dim() == 2):
                raise _NotLinear
            return torch.empty(val(arg).shape, device="meta") if meta else evaluate(gm, arg).double().cpu()

        coeff, op = self._transfer(gm, node, get, const_matrix, constants)
        src = found[0].src
        ops = frozenset().union(*(r.ops for r in found)) | ({op} if op else set())
        self._check_shapes(node, src, coeff, mixed=bool(ops))
        return _Rep(src, coeff, ops)

    @staticmethod
    def _check_shapes(node: fx.Node, src: fx.Node, coeff, mixed: bool) -> None:
        """Every value keeps src's leading dims and device, is floating, and its coefficients have
        its trailing shape (a safety net under each transfer rule)."""
        source, v = val(src), val(node)
        lead = list(source.shape[:-1])
        if isinstance(coeff, tuple):
            if not isinstance(v, (tuple, list)) or len(v) != len(coeff):
                raise _NotLinear
            pairs = list(zip(v, coeff))
        else:
            pairs = [(v, coeff)]
        for value, c in pairs:
            if not isinstance(value, Tensor) or not value.is_floating_point() or value.device != source.device:
                raise _NotLinear
            if list(value.shape[:len(lead)]) != lead or list(c.shape[:-1]) != list(value.shape[len(lead):]):
                raise _NotLinear
        if node.target in CASTS and mixed and v.dtype.itemsize > val(node.args[0]).dtype.itemsize:
            raise _NotLinear  # widening a result the region rounded: that rounding must stay

    def _transfer(self, gm, node: fx.Node, get, const_matrix, constants: dict):
        """(coefficients, mixing op or None) of ``node``; raises :class:`_NotLinear`."""
        t, args = node.target, node.args
        v = val(node)
        if t in CASTS:
            return get(args[0]), None
        if t is operator.getitem:
            c = get(args[0])
            if not isinstance(c, tuple):
                raise _NotLinear
            return c[args[1]], None
        if t in (aten.cat.default, aten.stack.default):
            tensors = _arg(node, 0, "tensors", None)
            cs = [get(a) for a in tensors]
            k = val(tensors[0]).dim() - (cs[0].dim() - 1)
            dim = _dim(_arg(node, 1, "dim", 0), v.dim(), k)
            return (torch.cat if t is aten.cat.default else torch.stack)(cs, dim), None
        if t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            x, factor = args[0], scalar(args[1], gm, constants)
            if factor is None and t is aten.mul.Tensor:  # scalar * x
                x, factor = args[1], scalar(args[0], gm, constants)
            if factor is None:
                raise _NotLinear
            c = get(x)
            return (c / factor if t in (aten.div.Tensor, aten.div.Scalar) else c * factor), None
        x = args[0]
        c = get(x)
        if not isinstance(c, Tensor):
            raise _NotLinear
        rank = val(x).dim()
        k = rank - (c.dim() - 1)  # src's leading dims
        if t in RESHAPES or t is aten.expand.default:
            if list(v.shape[:k]) != list(val(x).shape[:k]):
                raise _NotLinear  # moves data across rows
            shape = list(v.shape[k:]) + [c.shape[-1]]
            return (c.expand(shape) if t is aten.expand.default else c.reshape(shape)), None
        if t is aten.permute.default:
            dims = [d % rank for d in args[1]]
            if dims[:k] != list(range(k)):
                raise _NotLinear
            return c.permute([d - k for d in dims[k:]] + [c.dim() - 1]), None
        if t is aten.transpose.int:
            return c.transpose(_dim(args[1], rank, k), _dim(args[2], rank, k)), None
        if t is aten.slice.Tensor:
            dim = _dim(_arg(node, 1, "dim", 0), rank, k)
            step = slice(_arg(node, 2, "start", None), _arg(node, 3, "end", None), _arg(node, 4, "step", 1))
            return c[(slice(None),) * dim + (step,)], None
        if t is aten.narrow.default:
            return c.narrow(_dim(args[1], rank, k), args[2], args[3]), None
        if t is aten.select.int:
            return c.select(_dim(args[1], rank, k), args[2]), None
        if t is aten.unbind.int:
            return torch.unbind(c, _dim(_arg(node, 1, "dim", 0), rank, k)), None
        if t in SPLITS:
            return tuple(SPLITS[t](c, args[1], _dim(_arg(node, 2, "dim", 0), rank, k))), None
        if t in (aten.add.Tensor, aten.sub.Tensor):
            other = args[1]
            if not isinstance(other, fx.Node) or not (list(val(other).shape) == list(val(x).shape) == list(v.shape)):
                raise _NotLinear  # an affine term or a broadcast
            alpha = node.kwargs.get("alpha", 1)
            sign = alpha if t is aten.add.Tensor else -alpha
            return c + sign * get(other), ("add" if t is aten.add.Tensor else "sub")
        if t is aten.neg.default:
            return -c, None
        if t in PRODUCTS:
            if c.dim() < 2 or (t is aten.linear.default and _arg(node, 2, "bias", None) is not None):
                raise _NotLinear
            w = const_matrix(args[1])
            equation = "...in,ji->...jn" if t is aten.linear.default else "...in,ij->...jn"
            return torch.einsum(equation, c, w.to(c.dtype)), "matmul"
        raise _NotLinear

    # --- phase 2: exact coefficients, the check, the rewrite ------------------------------------------
    def _rewrite_region(self, gm, ctx: PassContext, src: fx.Node, nodes: list[fx.Node], reps: dict) -> None:
        region = set(nodes)
        escaping = [n for n in nodes if any(u not in region for u in n.users)]
        n = val(src).shape[-1]
        if n > MAX_PROBED_ROW:
            looks = set().union(*(reps[e].ops for e in escaping)) if escaping else set()
            if {"add", "sub"} <= looks or "matmul" in looks:
                ctx.skip(escaping[-1], f"a linear map over rows of {n} > {MAX_PROBED_ROW} elements (a butterfly "
                                       "or constant product) is not checked for a Hadamard at compile time")
            return
        matches = self._exact_matches(gm, src, nodes, reps)
        needed = set(escaping)
        rewrites = []
        for node in reversed(nodes):
            if node not in needed:
                continue
            if node in matches:
                rewrites.append(node)
            else:
                needed.update(a for a in node.all_input_nodes if a in region)
        for node in reversed(rewrites):
            self._replace(gm, ctx, src, node, *matches[node])

    def _exact_matches(self, gm, src: fx.Node, nodes: list[fx.Node], reps: dict) -> dict:
        """node -> (input node, block size d, scale) for every region node whose coefficients are
        exactly c * kron(I, H_d), where the input is src or a reshape/cast of it with last dim d
        that the node is computed from (the earliest such)."""
        n = val(src).shape[-1]
        order = {m: i for i, m in enumerate([src, *nodes])}
        basis = torch.eye(n, dtype=torch.float64) if n <= MAX_ROW else _probes(n)
        exact = {src: _Rep(src, basis, frozenset())}
        readers = {m: sum(1 for u in m.users if u in order) for m in order}
        chain, matches, constants = {src}, {}, {}
        for node in nodes:
            try:
                exact[node] = self._propagate(gm, node, exact, constants, meta=False)
            except _NotLinear:  # cannot happen if phase 1 agreed; then no match downstream
                continue
            if node.target in CASTS | RESHAPES and node.args[0] in chain:
                chain.add(node)
            found = self._check(exact[node], n, {val(a).shape[-1] for a in chain})
            if found is not None:
                inputs = [a for a in _ancestors(node, src, order) if a in chain and val(a).shape[-1] == found[0]]
                if inputs:
                    matches[node] = (min(inputs, key=order.__getitem__), *found)
            for a in node.all_input_nodes:  # drop coefficients no later region node reads
                if a in readers:
                    readers[a] -= 1
                    if readers[a] == 0 and a in exact:
                        exact[a].coeff = None
        return matches

    @staticmethod
    def _check(rep: _Rep, n: int, blocks: set[int]) -> Optional[tuple[int, float]]:
        """(d, c) if the node's coefficients are those of c * kron(I_{n/d}, H_d) with d in ``blocks``
        (the row lengths the code exposed), d >= 2: exactly (the n x n basis), or on the probes within
        float64 rounding (rows above ``MAX_ROW``)."""
        c = rep.coeff
        columns = n if n <= MAX_ROW else PROBES
        if not rep.ops or not isinstance(c, Tensor) or c.numel() != n * columns:
            return None
        flat = c.reshape(n, columns)
        if columns == n:
            support = flat[0].nonzero().flatten()
            d = support.numel()
            if d < 2 or d & (d - 1) or d not in blocks or not torch.equal(support, torch.arange(d)):
                return None
            scale = float(flat[0, 0])
            expected = torch.kron(torch.eye(n // d, dtype=torch.float64), _sylvester(d)) * scale
            return (d, scale) if torch.equal(flat, expected) else None
        for d in sorted(b for b in blocks if b >= 2 and not b & (b - 1) and not n % b):
            expected = _probed_hadamard(n, d)
            scale = float(flat[:, 0] @ expected[:, 0] / (expected[:, 0] @ expected[:, 0]))
            atol = _PROBE_ATOL * n * abs(scale)
            # the first rows reject most non-matches before the full comparison
            if scale != 0 and all(float((f - scale * e).abs().max()) <= atol
                                  for f, e in ((flat[:8], expected[:8]), (flat, expected))):
                return d, scale
        return None

    def _replace(self, gm, ctx: PassContext, src: fx.Node, node: fx.Node, x: fx.Node, d: int, scale: float) -> None:
        out = val(node)
        with gm.graph.inserting_before(node):
            inp = x
            widen = not val(x).is_floating_point() or out.dtype.itemsize > val(x).dtype.itemsize
            if widen:
                inp = call(gm.graph, aten.to.dtype, inp, out.dtype, like=node)
            backend, rejected = ctx.choose("hadamard", node, x=val(inp), scale=scale)
            if backend is None:
                return
            new = call(gm.graph, torch.ops.dsgraph.hadamard.default, inp, scale, backend, like=node)
            if val(new).dtype != out.dtype:
                new = call(gm.graph, aten.to.dtype, new, out.dtype, like=node)
            if list(val(new).shape) != list(out.shape):
                new = call(gm.graph, aten.view.default, new, list(out.shape), like=node)
        rows = val(x).numel() // d
        ctx.commit(gm, op="hadamard", old=node, new=new, inputs=[src], backend=backend, rejected=rejected,
                   detail=f"H_{d} on {rows} row(s) of {tuple(val(x).shape)} {val(x).dtype}, scale {scale:.6g}")


def _arg(node: fx.Node, index: int, name: str, default) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _dim(dim: int, rank: int, k: int) -> int:
    """A dim of a value of ``rank`` as a dim of its coefficients; the leading k dims are off limits."""
    dim = dim % rank if rank else 0
    if dim < k:
        raise _NotLinear
    return dim - k


def _ancestors(node: fx.Node, src: fx.Node, region) -> set[fx.Node]:
    """``node`` and the nodes of its region it is computed from, down to ``src``."""
    seen, stack = set(), [node]
    while stack:
        m = stack.pop()
        if m in seen or m not in region:
            continue
        seen.add(m)
        if m is not src:
            stack.extend(m.all_input_nodes)
    return seen


def _sylvester(d: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=4)
def _probed_hadamard(n: int, d: int) -> Tensor:
    """kron(I_{n/d}, H_d) @ _probes(n), by the butterfly (exact on integers)."""
    x = _probes(n).reshape(n // d, d, PROBES)
    h = 1
    while h < d:
        x = x.reshape(n // d, d // (2 * h), 2, h, PROBES)
        x = torch.cat([x[:, :, :1] + x[:, :, 1:], x[:, :, :1] - x[:, :, 1:]], dim=2)
        h *= 2
    return x.reshape(n, PROBES)


def _probes(n: int) -> Tensor:
    """[n, PROBES] random integers in [-2^10, 2^10) (fixed seed: the check is reproducible)."""
    gen = torch.Generator().manual_seed(n)
    return torch.randint(-(1 << 10), 1 << 10, (n, PROBES), generator=gen).double()

