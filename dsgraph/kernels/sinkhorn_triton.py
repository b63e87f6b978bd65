"""Triton kernels for ``dsgraph::sinkhorn``, forward and backward (semantics: ``sinkhorn_ref``).

A program owns a block of R matrices as one [R, M, M] fp32 register tile (M a power of two <= 16,
R·M² = ``TILE`` elements) and runs the softmax and every normalisation on it: one read of the
logits and one write of the result, whatever ``iters`` (eager launches 6 kernels per iteration).

Backward: step k of the loop, y = c / d with d = sum(c, axis) + eps, maps the incoming gradient g to
(g - sum(g·y, axis)) / d, so it needs its input c. The program first recomputes the forward from the
logits, writing each iteration's input to a scratch slot (iters slots of [R, M, M] per program; the
column step's input is recomputed from it, one row normalisation), then walks the steps in reverse
reading them back, and ends with the softmax's backward p·(g - sum(g·p, -1)). The grid is persistent
(at most 4 programs per SM loop over the blocks), so the scratch is at most 4·SMs × iters × TILE × 4
bytes (11 MB at iters = 20 on an H100; at most ``MAX_SCRATCH``) whatever the number of matrices: it
stays in L2, and nothing is kept from the forward but the logits. The iterates are recomputed by the
forward kernel's operations, so the backward differentiates what the forward returned.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .common import triton_device_reason

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_M = 16
TILE = 256  # elements of one program's [R, M, M] tile (R = TILE // M²: 1 at M = 16)
MAX_SCRATCH = 1 << 25  # bytes of backward scratch (fewer programs for very many iterations)


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
    return c / (tl.expand_dims(tl.sum(c, AXIS), AXIS) + eps)


@triton.jit
def _normalise_backward(c, g, eps, AXIS: tl.constexpr):
    """The gradient of c given g, the gradient of _normalise(c)."""
    d = tl.expand_dims(tl.sum(c, AXIS), AXIS) + eps
    return (g - tl.expand_dims(tl.sum(g * (c / d), AXIS), AXIS)) / d


@triton.jit
def _softmax(x):
    e = tl.exp(x - tl.expand_dims(tl.max(x, 2), 2))
    return e / tl.expand_dims(tl.sum(e, 2), 2)


@triton.jit
def _tile(block, n, M: tl.constexpr, R: tl.constexpr):
    """Offsets of a block's [R, M, M] tile (int64) and its mask (matrices past n)."""
    r = block * R + tl.arange(0, R)
    i = tl.arange(0, M)
    offsets = r.to(tl.int64)[:, None, None] * (M * M) + (i[None, :, None] * M + i[None, None, :])
    return offsets, (r < n)[:, None, None]


@triton.jit
def _fwd(X, OUT, n, iters, eps, M: tl.constexpr, R: tl.constexpr, ROW_FIRST: tl.constexpr):
    offsets, mask = _tile(tl.program_id(0), n, M, R)
    c = _softmax(tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)) + eps
    if ROW_FIRST:
        c = _normalise(c, eps, 2)
    c = _normalise(c, eps, 1)
    for _ in range(iters - 1):
        c = _normalise(c, eps, 2)
        c = _normalise(c, eps, 1)
    tl.store(OUT + offsets, c, mask=mask)


@triton.jit
def _bwd(X, G, DX, SCRATCH, n, n_blocks, iters, eps, M: tl.constexpr, R: tl.constexpr, ROW_FIRST: tl.constexpr):
    # Slot t holds iteration t's input; the input of its column step (the row step's output) is
    # recomputed from it, which halves the scratch.
    TILE_: tl.constexpr = R * M * M
    local = tl.arange(0, R)[:, None, None] * (M * M) + (tl.arange(0, M)[None, :, None] * M
                                                         + tl.arange(0, M)[None, None, :])
    slots = SCRATCH + tl.program_id(0).to(tl.int64) * iters * TILE_ + local
    for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        offsets, mask = _tile(block, n, M, R)
        p = _softmax(tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32))
        c = p + eps
        tl.debug_barrier()  # the previous block's reads of the scratch are done
        tl.store(slots, c)
        if ROW_FIRST:
            c = _normalise(c, eps, 2)
        c = _normalise(c, eps, 1)
        for t in range(1, iters):
            tl.store(slots + t * TILE_, c)
            c = _normalise(_normalise(c, eps, 2), eps, 1)
        tl.debug_barrier()  # the scratch is written before any thread reads it back
        g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
        for i in range(0, iters - 1):
            a = tl.load(slots + (iters - 1 - i) * TILE_)
            g = _normalise_backward(_normalise(a, eps, 2), g, eps, 1)
            g = _normalise_backward(a, g, eps, 2)
        a = tl.load(slots)
        if ROW_FIRST:
            g = _normalise_backward(_normalise(a, eps, 2), g, eps, 1)
            g = _normalise_backward(a, g, eps, 2)
        else:
            g = _normalise_backward(a, g, eps, 1)
        dx = p * (g - tl.expand_dims(tl.sum(g * p, 2), 2))
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


def _layout(m: int) -> tuple[int, int]:
    """(matrices per program, num_warps)."""
    return TILE // (m * m), 2


def _check(logits, iters, eps, row_first):
    reason = triton_unsupported_reason(logits, iters, eps, row_first)
    if reason is not None:
        raise ValueError(f"sinkhorn_triton: {reason}")


def sinkhorn_triton(logits: torch.Tensor, iters: int, eps: float, row_first: bool = False) -> torch.Tensor:
    _check(logits, iters, eps, row_first)
    m = logits.shape[-1]
    mats = logits.reshape(-1, m, m).contiguous()
    out = torch.empty(mats.shape, dtype=torch.float32, device=logits.device)
    n = mats.shape[0]
    if n:
        r, warps = _layout(m)
        _fwd[(triton.cdiv(n, r),)](mats, out, n, iters, float(eps), M=m, R=r, ROW_FIRST=row_first, num_warps=warps)
    return out.view(logits.shape)


def sinkhorn_triton_backward(logits: torch.Tensor, grad: torch.Tensor, iters: int, eps: float,
                             row_first: bool = False) -> torch.Tensor:
    _check(logits, iters, eps, row_first)
    m = logits.shape[-1]
    mats, grads = logits.reshape(-1, m, m).contiguous(), grad.reshape(-1, m, m).contiguous()
    dx = torch.empty(mats.shape, dtype=logits.dtype, device=logits.device)
    n = mats.shape[0]
    if n:
        r, warps = _layout(m)
        n_blocks = triton.cdiv(n, r)
        if _INTERPRET or logits.device.type != "cuda":
            programs = min(n_blocks, 4)
        else:  # persistent: the scratch of 4 programs per SM stays in L2
            sms = torch.cuda.get_device_properties(logits.device).multi_processor_count
            programs = max(1, min(n_blocks, 4 * sms, MAX_SCRATCH // (iters * r * m * m * 4)))
        scratch = torch.empty((programs, iters, r * m * m), dtype=torch.float32, device=logits.device)
        _bwd[(programs,)](mats, grads, dx, scratch, n, n_blocks, iters, float(eps), M=m, R=r, ROW_FIRST=row_first,
                          num_warps=warps)
    return dx.view(logits.shape)
