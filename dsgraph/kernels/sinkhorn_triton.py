"""Triton kernels for ``dsgraph::sinkhorn``, forward and backward (semantics: ``sinkhorn_ref``).

A program owns ``BLOCK`` matrices as one [BLOCK, M, M] fp32 register tile (M a power of two <= 16)
and runs the softmax and every normalisation on it: one read of the logits and one write of the
result, whatever ``iters``. For M <= 4 (``PER_THREAD``) a thread owns whole matrices: its rows are
loaded as M-wide vectors and joined in registers, so every row and column sum is an in-thread add
and the iteration loop has no shuffles and no shared memory. Larger matrices (64 or 256 floats)
spread across threads, whose sums then cross them. A normalisation takes one reciprocal per row or
column and multiplies (the special-function unit, not memory, bounds these kernels at M = 4).

Backward: step k of the loop, y = c·r with r = 1 / (sum(c, axis) + eps), maps the incoming gradient
g to (g - sum(g·y, axis))·r, so it needs its input c. Nothing is kept from the forward but the
logits, and nothing is written to memory: the iterates are recomputed in registers. The iterations
are walked in reverse in segments of ``SEG`` (about sqrt(iters)): a segment's first input is
recomputed from the softmax, and each step's input from the segment's first (about iters²/(2·SEG) +
iters·SEG/2 recomputed iterations, against iters for a forward). The recomputation runs the forward
kernel's operations, so the backward differentiates what the forward returned.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .common import triton_device_reason

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_M = 16


def triton_unsupported_reason(logits: torch.Tensor, iters: int, eps: float, row_first: bool = False) -> Optional[str]:
    reason = triton_device_reason([logits], _INTERPRET, "Triton Sinkhorn")
    if reason is not None:
        return reason
    if logits.dtype not in _DTYPES:
        return f"logits dtype {logits.dtype} not supported (fp16, bf16, fp32; the kernel computes in fp32)"
    m = logits.shape[-1]
    if m > MAX_M or m & (m - 1):
        return f"M = {m} is not a power of two <= {MAX_M} (a matrix is one [M, M] register tile)"
    return None


@triton.jit
def _normalise(c, eps, AXIS: tl.constexpr):
    """c / (sum(c, AXIS) + eps): AXIS 1 normalises columns, 2 rows."""
    return c * tl.expand_dims(1.0 / (tl.sum(c, AXIS) + eps), AXIS)


@triton.jit
def _normalise_backward(c, g, eps, AXIS: tl.constexpr):
    """The gradient of c given g, the gradient of _normalise(c)."""
    r = tl.expand_dims(1.0 / (tl.sum(c, AXIS) + eps), AXIS)
    return (g - tl.expand_dims(tl.sum(g * (c * r), AXIS), AXIS)) * r


@triton.jit
def _softmax(x):
    e = tl.exp(x - tl.expand_dims(tl.max(x, 2), 2))
    return e * tl.expand_dims(1.0 / tl.sum(e, 2), 2)


@triton.jit
def _iterate(c, eps, steps):
    """``steps`` (row, column) iterations."""
    for _ in range(steps):
        c = _normalise(_normalise(c, eps, 2), eps, 1)
    return c


@triton.jit
def _element(rows, mask, i: tl.constexpr, j: tl.constexpr, M: tl.constexpr):
    return tl.load(rows + (i * M + j), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _quad(rows, mask, i: tl.constexpr, j: tl.constexpr, M: tl.constexpr):
    """The [BLOCK, 2, 2] block of elements (i, j) to (i + 1, j + 1), each matrix's in one thread."""
    return tl.join(tl.join(_element(rows, mask, i, j, M), _element(rows, mask, i + 1, j, M)),
                   tl.join(_element(rows, mask, i, j + 1, M), _element(rows, mask, i + 1, j + 1, M)))


@triton.jit
def _load(PTR, block, n, M: tl.constexpr, BLOCK: tl.constexpr, PER_THREAD: tl.constexpr):
    """A block's [BLOCK, M, M] tile as fp32 (zeros past n), with the offsets and mask to store it."""
    r = block * BLOCK + tl.arange(0, BLOCK)
    j = tl.arange(0, M)
    mask = (r < n)[:, None, None]
    offsets = r.to(tl.int64)[:, None, None] * (M * M) + (j[None, :, None] * M + j[None, None, :])
    if PER_THREAD:
        # Elements loaded one [BLOCK] vector each and joined: joins add in-thread dimensions, so the
        # tile's layout keeps a matrix in one thread (a 2-D load would spread its rows over lanes).
        rows = PTR + r.to(tl.int64) * (M * M)
        if M == 2:
            tile = _quad(rows, r < n, 0, 0, M)
        else:  # M == 4: [BLOCK, i % 2, j % 2, i // 2, j // 2] -> [BLOCK, i, j]
            tile = tl.join(tl.join(_quad(rows, r < n, 0, 0, M), _quad(rows, r < n, 2, 0, M)),
                           tl.join(_quad(rows, r < n, 0, 2, M), _quad(rows, r < n, 2, 2, M)))
            tile = tl.reshape(tl.permute(tile, (0, 3, 1, 4, 2)), (BLOCK, M, M))
    else:
        tile = tl.load(PTR + offsets, mask=mask, other=0.0).to(tl.float32)
    return tile, offsets, mask


@triton.jit
def _fwd(X, OUT, n, iters, eps, M: tl.constexpr, BLOCK: tl.constexpr, PER_THREAD: tl.constexpr,
         ROW_FIRST: tl.constexpr):
    x, offsets, mask = _load(X, tl.program_id(0), n, M, BLOCK, PER_THREAD)
    c = _softmax(x) + eps
    if ROW_FIRST:
        c = _normalise(c, eps, 2)
    c = _iterate(_normalise(c, eps, 1), eps, iters - 1)
    tl.store(OUT + offsets, c, mask=mask)


@triton.jit
def _bwd(X, G, DX, n, iters, eps, SEG, M: tl.constexpr, BLOCK: tl.constexpr, PER_THREAD: tl.constexpr,
         ROW_FIRST: tl.constexpr):
    # Iteration t maps its input a_t to a_{t+1} = col(row(a_t)); a_0 = softmax + eps, and without
    # ROW_FIRST iteration 0 is the column step alone. a_1 is the first input of the uniform loop.
    x, offsets, mask = _load(X, tl.program_id(0), n, M, BLOCK, PER_THREAD)
    g = _load(G, tl.program_id(0), n, M, BLOCK, PER_THREAD)[0]
    p = _softmax(x)
    a0 = p + eps
    if ROW_FIRST:
        a1 = _normalise(_normalise(a0, eps, 2), eps, 1)
    else:
        a1 = _normalise(a0, eps, 1)
    for k in range(0, tl.cdiv(iters - 1, SEG)):  # segments [start, end) of iterations 1..iters-1, last first
        start = 1 + (tl.cdiv(iters - 1, SEG) - 1 - k) * SEG
        first = _iterate(a1, eps, start - 1)
        for i in range(0, tl.minimum(SEG, iters - start)):
            a = _iterate(first, eps, tl.minimum(SEG, iters - start) - 1 - i)
            g = _normalise_backward(a, _normalise_backward(_normalise(a, eps, 2), g, eps, 1), eps, 2)
    if ROW_FIRST:
        g = _normalise_backward(a0, _normalise_backward(_normalise(a0, eps, 2), g, eps, 1), eps, 2)
    else:
        g = _normalise_backward(a0, g, eps, 1)
    dx = p * (g - tl.expand_dims(tl.sum(g * p, 2), 2))
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


def _config(m: int, block: Optional[int], num_warps: Optional[int]) -> tuple[int, int, bool]:
    """(matrices per program, num_warps, whether a thread owns whole matrices)."""
    per_thread = m in (2, 4)
    if per_thread:  # one matrix per thread by default
        warps = num_warps or 4
        block = block or 32 * warps
    else:  # a 256-element tile
        warps = num_warps or 2
        block = block or max(1, 256 // (m * m))
    if block & (block - 1):
        raise ValueError(f"sinkhorn_triton: block must be a power of two, got {block}")
    return block, warps, per_thread


def _check(logits, iters, eps, row_first):
    reason = triton_unsupported_reason(logits, iters, eps, row_first)
    if reason is not None:
        raise ValueError(f"sinkhorn_triton: {reason}")


def sinkhorn_triton(logits: torch.Tensor, iters: int, eps: float, row_first: bool = False, *,
                    block: Optional[int] = None, num_warps: Optional[int] = None) -> torch.Tensor:
    """``block`` (matrices per program) and ``num_warps`` override the defaults (benchmarks/sinkhorn_sweep.py)."""
    _check(logits, iters, eps, row_first)
    m = logits.shape[-1]
    mats = logits.reshape(-1, m, m).contiguous()
    out = torch.empty(mats.shape, dtype=torch.float32, device=logits.device)
    n = mats.shape[0]
    if n:
        block, warps, per_thread = _config(m, block, num_warps)
        _fwd[(triton.cdiv(n, block),)](mats, out, n, iters, float(eps), M=m, BLOCK=block, PER_THREAD=per_thread,
                                       ROW_FIRST=row_first, num_warps=warps)
    return out.view(logits.shape)


def sinkhorn_triton_backward(logits: torch.Tensor, grad: torch.Tensor, iters: int, eps: float,
                             row_first: bool = False, *, block: Optional[int] = None,
                             num_warps: Optional[int] = None, segment: Optional[int] = None) -> torch.Tensor:
    """``segment``: iterations recomputed from one recomputed input (default about sqrt(iters))."""
    _check(logits, iters, eps, row_first)
    m = logits.shape[-1]
    mats, grads = logits.reshape(-1, m, m).contiguous(), grad.reshape(-1, m, m).contiguous()
    dx = torch.empty(mats.shape, dtype=logits.dtype, device=logits.device)
    n = mats.shape[0]
    if n:
        block, warps, per_thread = _config(m, block, num_warps)
        seg = segment or max(1, math.isqrt(max(iters - 1, 1)))
        _bwd[(triton.cdiv(n, block),)](mats, grads, dx, n, iters, float(eps), seg, M=m, BLOCK=block,
                                       PER_THREAD=per_thread, ROW_FIRST=row_first, num_warps=warps)
    return dx.view(logits.shape)
