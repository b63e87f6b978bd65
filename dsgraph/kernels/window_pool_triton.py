"""Triton kernels for ``dsgraph::window_pool``, forward and backward (semantics: ``window_pool_ref``).

The op is bandwidth-bound (a handful of flops per element read), so both kernels read each input
element once: a program owns BP windows x BD output features of one batch row and walks the window's
slots in [RJ, BP, BD] tiles of kv and score (plus ape, L2-resident) with an online softmax (one
chunk, RJ >= ratio, for small ratios). In overlap mode a second pair of tiles holds the previous
window's first feature half at the same columns: each token's first half is read only by the window
after it, so nothing is read twice. Math in fp32 registers; only [BP, BD] results are written.

Layout: the slot axis is the tile's outermost, and the default configs size BP x BD to the lanes and
warps (16-byte vectors along features), so Triton's default blocked layout keeps each column's slots
in one thread: the reductions need no shared memory or barriers. (Slots in the middle axis, as
before, put warps on the slot axis: every reduction went through shared memory.)

Backward: the program recomputes the softmax and writes dkv = g·p and dscore = g·p·(kv - pooled)
at the positions it read (slots the op never reads are zeroed by the wrapper: tokens past P·r and,
in overlap mode, the last window's first half). dape sums dscore over batch rows and windows: each
program loops over a run of windows and keeps one fp32 [r, w] partial (registers for one-chunk
windows, its own slice of the partials buffer otherwise) that torch sums.
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
TILE = 4096  # default elements of one [RJ, BP, BD] tile (16 per thread at 8 warps)
MAX_CHUNK = 16  # default slots per tile: larger windows are walked in chunks


def triton_unsupported_reason(kv, score, ape, ratio: int, overlap: bool) -> Optional[str]:
    reason = triton_device_reason([kv, score, ape], _INTERPRET, "Triton window pool")
    if reason is not None:
        return reason
    for name, t in (("kv", kv), ("score", score), ("ape", ape)):
        if t is not None and t.dtype not in _DTYPES:
            return f"{name} dtype {t.dtype} not supported (fp16, bf16, fp32; the kernel computes in fp32)"
    return None


@triton.jit
def _tile(KV, S, APE, n, j, col, W, skn, ssn, mask, R: tl.constexpr):
    """kv and score + ape of slots j of windows n at feature columns col: [RJ, BP, BD] fp32 tiles (kv 0
    and score -inf where masked) and their token offsets. The slot axis is outermost so that Triton's
    default layout spreads lanes and warps over windows and features first: the softmax reductions
    over slots stay inside each thread (no shared-memory round trips)."""
    tok = n.to(tl.int64)[None, :, None] * R + j[:, None, None]
    kv = tl.load(KV + tok * skn + col[None, None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + tok * ssn + col[None, None, :], mask=mask, other=float("-inf")).to(tl.float32)
    s += tl.load(APE + j[:, None, None] * W + col[None, None, :], mask=mask, other=0.0)
    return kv, s, tok


@triton.jit
def _masks(n, j, f, j0, P, D, R: tl.constexpr, OVERLAP: tl.constexpr):
    """Masks of the own and (overlap) previous-window tiles of slots j0 + j."""
    rows = (n < P)[None, :, None] & (f < D)[None, None, :]
    mask = rows & (j0 + j < R)[:, None, None]
    return mask, mask & (n >= 1)[None, :, None] if OVERLAP else mask


@triton.jit
def _update(m, den, num, kv, s, kvp, sp, OVERLAP: tl.constexpr):
    """Online softmax over one chunk of slots: running max, denominator, numerator per [BP, BD]
    column. The max used in exp is 0 while nothing is finite (-inf - -inf would be NaN); an all -inf
    column so ends 0 / 0 = NaN, as eager's softmax."""
    top = tl.max(s, 0)
    if OVERLAP:
        top = tl.maximum(top, tl.max(sp, 0))
    top = tl.maximum(m, top)
    safe = tl.where(top == float("-inf"), 0.0, top)
    alpha = tl.exp(m - safe)
    e = tl.exp(s - safe[None, :, :])
    den = den * alpha + tl.sum(e, 0)
    num = num * alpha + tl.sum(e * kv, 0)
    if OVERLAP:
        ep = tl.exp(sp - safe[None, :, :])
        den += tl.sum(ep, 0)
        num += tl.sum(ep * kvp, 0)
    return top, safe, den, num


@triton.jit
def _chunk(KV, S, APE, n, j, f, j0, P, W, D, skn, ssn, R: tl.constexpr, OVERLAP: tl.constexpr):
    """The own tiles (column f + D in overlap mode) and the previous window's first-half tiles of slots j0 + j."""
    mask, mask_prev = _masks(n, j, f, j0, P, D, R, OVERLAP)
    kv, s, tok = _tile(KV, S, APE, n, j0 + j, f + D if OVERLAP else f, W, skn, ssn, mask, R)
    kvp, sp, tokp = kv, s, tok
    if OVERLAP:
        kvp, sp, tokp = _tile(KV, S, APE, n - 1, j0 + j, f, W, skn, ssn, mask_prev, R)
    return kv, s, tok, mask, kvp, sp, tokp, mask_prev


@triton.jit
def _fwd(KV, S, APE, OUT, P, W, D, skb, skn, ssb, ssn, R: tl.constexpr, RJ: tl.constexpr, BP: tl.constexpr,
         BD: tl.constexpr, OVERLAP: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    n = tl.program_id(0) * BP + tl.arange(0, BP)
    f = tl.program_id(1) * BD + tl.arange(0, BD)
    j = tl.arange(0, RJ)
    KV += b * skb
    S += b * ssb
    m = tl.full((BP, BD), float("-inf"), tl.float32)
    den = tl.zeros((BP, BD), tl.float32)
    num = tl.zeros((BP, BD), tl.float32)
    for j0 in range(0, R, RJ):
        kv, s, _, _, kvp, sp, _, _ = _chunk(KV, S, APE, n, j, f, j0, P, W, D, skn, ssn, R, OVERLAP)
        m, _, den, num = _update(m, den, num, kv, s, kvp, sp, OVERLAP)
    out = OUT + b * P * D + n.to(tl.int64)[:, None] * D + f[None, :]
    tl.store(out, (num / den).to(OUT.dtype.element_ty), mask=(n < P)[:, None] & (f < D)[None, :])


@triton.jit
def _grads(DKV, DS, at, kv, s, safe, den, pooled, g, mask):
    """Stores dkv = g·p and dscore = g·p·(kv - pooled) of one tile and returns dscore."""
    p = tl.exp(s - safe[None, :, :]) / den[None, :, :] * g
    ds = tl.where(mask, p * (kv - pooled[None, :, :]), 0.0)  # rows past P hold NaN softmaxes
    tl.store(DKV + at, p.to(DKV.dtype.element_ty), mask=mask)
    tl.store(DS + at, ds.to(DS.dtype.element_ty), mask=mask)
    return ds


@triton.jit
def _bwd(KV, S, APE, G, DKV, DS, DAPE, P, W, D, skb, skn, ssb, ssn, sgb, per_chunk,
         R: tl.constexpr, RJ: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr, OVERLAP: tl.constexpr):
    """One program: windows [chunk·per_chunk, +per_chunk) x BD features. A window that fits one slot
    chunk (RJ >= R) keeps its tiles in registers between the softmax and the gradients, and its dape
    partial in registers across windows; larger windows are read twice (the second read of a
    program's few-KB tiles mostly hits L2) and add their dape partials into the program's own slice
    of DAPE (read-modify-write, no other program touches it)."""
    b = tl.program_id(2).to(tl.int64)
    chunk = tl.program_id(0)
    f = tl.program_id(1) * BD + tl.arange(0, BD)
    j = tl.arange(0, RJ)
    own = f + D if OVERLAP else f
    KV += b * skb
    S += b * ssb
    DKV += b * sgb  # dkv and dscore are contiguous [B, N, W]
    DS += b * sgb
    part = DAPE + (b * tl.num_programs(0) + chunk) * R * W
    # One-chunk windows: dape accumulates per tile element, reduced over windows once at the end
    # (a reduction over BP per window would cross warps).
    acc = tl.zeros((RJ, BP, BD), dtype=tl.float32)
    acc_prev = tl.zeros((RJ, BP, BD), dtype=tl.float32)
    end = tl.minimum(chunk * per_chunk + per_chunk, P)
    for start in range(chunk * per_chunk, end, BP):
        n = start + tl.arange(0, BP)
        # [1, BP, BD], in the tiles' layout
        g = tl.load(G + b * P * D + n.to(tl.int64)[None, :, None] * D + f[None, None, :],
                    mask=(n < end)[None, :, None] & (f < D)[None, None, :], other=0.0).to(tl.float32)
        m = tl.full((BP, BD), float("-inf"), tl.float32)
        safe = m
        den = tl.zeros((BP, BD), tl.float32)
        num = tl.zeros((BP, BD), tl.float32)
        if RJ >= R:
            kv, s, tok, mask, kvp, sp, tokp, mask_prev = _chunk(KV, S, APE, n, j, f, 0, end, W, D, skn, ssn, R, OVERLAP)
            m, safe, den, num = _update(m, den, num, kv, s, kvp, sp, OVERLAP)
            pooled = num / den
            acc += _grads(DKV, DS, tok * W + own[None, None, :], kv, s, safe, den, pooled, g, mask)
            if OVERLAP:
                acc_prev += _grads(DKV, DS, tokp * W + f[None, None, :], kvp, sp, safe, den, pooled, g, mask_prev)
        else:
            for j0 in range(0, R, RJ):
                kv, s, _, _, kvp, sp, _, _ = _chunk(KV, S, APE, n, j, f, j0, end, W, D, skn, ssn, R, OVERLAP)
                m, safe, den, num = _update(m, den, num, kv, s, kvp, sp, OVERLAP)
            pooled = num / den
            for j0 in range(0, R, RJ):
                kv, s, tok, mask, kvp, sp, tokp, mask_prev = _chunk(KV, S, APE, n, j, f, j0, end, W, D, skn, ssn, R,
                                                                     OVERLAP)
                cols = (j0 + j < R)[:, None] & (f < D)[None, :]
                at = part + (j0 + j)[:, None] * W + own[None, :]
                ds = _grads(DKV, DS, tok * W + own[None, None, :], kv, s, safe, den, pooled, g, mask)
                tl.store(at, tl.load(at, mask=cols) + tl.sum(ds, 1), mask=cols)
                if OVERLAP:
                    at = part + (j0 + j)[:, None] * W + f[None, :]
                    ds = _grads(DKV, DS, tokp * W + f[None, None, :], kvp, sp, safe, den, pooled, g, mask_prev)
                    tl.store(at, tl.load(at, mask=cols) + tl.sum(ds, 1), mask=cols)
    if RJ >= R:
        at = part + j[:, None] * W
        cols = (j < R)[:, None] & (f < D)[None, :]
        tl.store(at + own[None, :], tl.sum(acc, 1), mask=cols)
        if OVERLAP:
            tl.store(at + f[None, :], tl.sum(acc_prev, 1), mask=cols)


# Defaults measured by benchmarks/window_pool_sweep.py on an H100 (2026-11-26, S = 16384): keyed by
# (window walked in chunks, backward, fp32). Ratio 4 w 1024 fp32: fwd 58.5 us (73% of HBM), bwd 118 us
# (70%); bf16: 35.5 / 93.1 us; ratio 128 w 512 fp32: 34.7 / 113.8 us (the chunked bf16 rows reuse fp32's).
_TUNED = {
    (False, False, True): {"block_p": 2, "block_d": 256, "num_warps": 2},
    (False, False, False): {"block_p": 1, "block_d": 256, "num_warps": 1},
    (False, True, True): {"block_p": 2, "block_d": 64, "num_warps": 1},
    (False, True, False): {"block_p": 2, "block_d": 128, "num_warps": 1},
    (True, False, True): {"block_r": 32, "block_p": 1, "block_d": 128, "num_warps": 2},
    (True, True, True): {"block_p": 2, "block_d": 128, "num_warps": 2},
}
_TUNED[(True, False, False)], _TUNED[(True, True, False)] = _TUNED[(True, False, True)], _TUNED[(True, True, True)]


def config(ratio: int, d: int, windows: int, elem_size: int, block_r: Optional[int] = None,
           block_p: Optional[int] = None, block_d: Optional[int] = None, num_warps: Optional[int] = None,
           backward: bool = False) -> tuple[int, int, int, int]:
    """(RJ, BP, BD, warps): RJ slots of BP windows x BD features per tile. Each argument given
    overrides its default (the sweep in benchmarks/window_pool_sweep.py picks them). A window larger
    than RJ slots is walked in chunks with an online softmax. By default lanes and warps cover the
    [BP, BD] plane exactly (16-byte vectors along features), so the reductions over slots stay in
    each thread; multi-chunk windows go one per tile (more programs; the backward's dape partial is
    per slot)."""
    chunked = min(triton.next_power_of_2(ratio), MAX_CHUNK) < ratio
    tuned = _TUNED[(chunked, backward, elem_size == 4)]
    rj = block_r or tuned.get("block_r") or min(triton.next_power_of_2(ratio), MAX_CHUNK)
    bd = block_d or max(16, min(triton.next_power_of_2(d), tuned["block_d"]))
    if block_p:
        bp = block_p
    elif rj < ratio and not backward:
        bp = 1
    else:
        bp = max(1, min(tuned["block_p"], TILE // (rj * bd), triton.next_power_of_2(max(windows, 1))))
    warps = num_warps or tuned["num_warps"]
    for name, v in (("block_r", rj), ("block_p", bp), ("block_d", bd), ("num_warps", warps)):
        if v & (v - 1):
            raise ValueError(f"window_pool_triton: {name} must be a power of two, got {v}")
    return rj, bp, bd, warps


def _prepare(kv, score, ape, ratio, overlap):
    from ..ops.window_pool import check_window_pool_args
    check_window_pool_args(kv, score, ape, ratio, overlap)
    reason = triton_unsupported_reason(kv, score, ape, ratio, overlap)
    if reason is not None:
        raise ValueError(f"window_pool_triton: {reason}")
    kv, score = (t if t.stride(-1) == 1 else t.contiguous() for t in (kv, score))
    w = kv.shape[-1]
    ape = torch.zeros(ratio, w, device=kv.device) if ape is None else ape.float().contiguous()
    return kv, score, ape


def window_pool_triton(kv, score, ape, ratio: int, overlap: bool, out_dtype: torch.dtype, *,
                       block_r: Optional[int] = None, block_p: Optional[int] = None, block_d: Optional[int] = None,
                       num_warps: Optional[int] = None) -> torch.Tensor:
    kv, score, ape32 = _prepare(kv, score, ape, ratio, overlap)
    B, N, w = kv.shape
    P, D = N // ratio, w // 2 if overlap else w
    out = torch.empty(B, P, D, dtype=out_dtype, device=kv.device)
    if out.numel():
        rj, bp, bd, warps = config(ratio, D, P, kv.element_size(), block_r, block_p, block_d, num_warps)
        _fwd[(triton.cdiv(P, bp), triton.cdiv(D, bd), B)](
            kv, score, ape32, out, P, w, D, kv.stride(0), kv.stride(1), score.stride(0), score.stride(1),
            R=ratio, RJ=rj, BP=bp, BD=bd, OVERLAP=overlap, num_warps=warps)
    return out


def window_pool_triton_backward(kv, score, ape, grad, ratio: int, overlap: bool, *, block_r: Optional[int] = None,
                                block_p: Optional[int] = None, block_d: Optional[int] = None,
                                num_warps: Optional[int] = None, programs: Optional[int] = None):
    """``programs``: how many programs to aim for (default 8 per SM); each writes one fp32 dape
    partial [r, w] that torch sums, so more programs cost more partials."""
    kv, score, ape32 = _prepare(kv, score, ape, ratio, overlap)
    B, N, w = kv.shape
    P, D = N // ratio, w // 2 if overlap else w
    dkv = torch.empty(B, N, w, dtype=kv.dtype, device=kv.device)
    ds = torch.empty(B, N, w, dtype=score.dtype, device=kv.device)
    # What no window reads: tokens past P·r and, in overlap mode, the last window's first half.
    dkv[:, P * ratio:].zero_()
    ds[:, P * ratio:].zero_()
    if overlap and P:
        dkv[:, (P - 1) * ratio:P * ratio, :D].zero_()
        ds[:, (P - 1) * ratio:P * ratio, :D].zero_()
    rj, bp, bd, warps = config(ratio, D, P, kv.element_size(), block_r, block_p, block_d, num_warps, backward=True)
    blocks, fblocks = triton.cdiv(P, bp), triton.cdiv(D, bd)
    if programs is None:
        programs = 8 * (torch.cuda.get_device_properties(kv.device).multi_processor_count
                        if kv.device.type == "cuda" else 1)
    chunks = max(1, min(blocks, triton.cdiv(programs, fblocks * B)))
    per_chunk = triton.cdiv(blocks, chunks) * bp
    chunks = triton.cdiv(P, per_chunk) if P else 1
    parts = torch.zeros(B * chunks, ratio, w, dtype=torch.float32, device=kv.device)
    if P:
        g = grad.contiguous()
        _bwd[(chunks, fblocks, B)](
            kv, score, ape32, g, dkv, ds, parts, P, w, D, kv.stride(0), kv.stride(1), score.stride(0),
            score.stride(1), N * w, per_chunk, R=ratio, RJ=rj, BP=bp, BD=bd, OVERLAP=overlap, num_warps=warps)
    dape = parts.sum(0)
    return dkv, ds, dape if ape is None else dape.to(ape.dtype)
