"""Triton kernels for ``dsgraph::indexer_scores`` (forward and backward) and ``dsgraph::indexer_topk``.

Same semantics as ``indexer_ref`` (see ``dsgraph/ops/indexer.py``).

- Scores forward: a program per (query block, key block, batch row) loops over the heads,
  ``relu(q_h kᵀ)`` (fp32 accumulate) weighted and summed in registers; [B, S, H, T] never exists.
  Blocks entirely outside the band store -inf without computing.
- Backward: dq and dweights per (query block, head, batch row), looping over the key blocks of the
  band; dk per (key block, batch row), looping over the query blocks of the band and the heads
  (no atomics). q . k is recomputed tile by tile.
- Top-k: the fused scores kernel fills an [B, chunk, T] fp32 buffer for ``_TOPK_ROWS`` queries at a
  time and ``torch.topk`` selects per chunk, so memory is O(B · chunk · T), never [B, S, H, T] nor
  the full [B, S, T]. (A streaming top-k in registers needs indices next to the values; Triton's
  ``tl.topk``/``tl.sort`` (3.6 on the GPU, 3.9 here) return values only, for power-of-two k.)
- fp16/bf16 feed the tensor cores (the relu-gradient tile is rounded to the input dtype for the
  backward products, as in flash kernels); fp32 uses ``input_precision="ieee"``, never tf32.
  Batch and row offsets are int64 and the operands contiguous, so no int32 index limit applies.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_triton import _BIG, _INTERPRET, _dot, _visit_range
from .common import triton_device_reason
from .indexer_ref import check_indexer_args

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
# One small tile under the interpreter (it runs every program in Python); H100-sized tiles otherwise.
_BLOCK = 16 if _INTERPRET else 64
# Queries per top-k chunk: the [B, chunk, T] fp32 buffer is all the top-k path holds.
_TOPK_ROWS = 256


@triton.jit
def _scores_fwd(Q, K, W, BIAS, OUT, S, T, H, D,
                sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sbb, sbs, sbt, sob, sos, sot,
                lower, upper, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    n0 = tl.program_id(1) * BLOCK_N
    b = tl.program_id(2).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    rows = offs_m.to(tl.int64)
    io_mask = (offs_m[:, None] < S) & (offs_n[None, :] < T)
    out_ptrs = OUT + b * sob + rows[:, None] * sos + offs_n[None, :] * sot
    # t - s over the tile spans [n0 - m0 - BLOCK_M + 1, n0 + BLOCK_N - 1 - m0].
    if (n0 + BLOCK_N - 1 - m0 < lower) | (n0 - m0 - BLOCK_M + 1 > upper):
        tl.store(out_ptrs, tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32), mask=io_mask)
    else:
        k = tl.load(K + b * skb + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :] * skd,
                    mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0)
        kt = tl.trans(k)
        q_ptrs = Q + b * sqb + rows[:, None] * sqs + offs_d[None, :] * sqd
        w_ptrs = W + b * swb + rows * sws
        q_mask = (offs_m[:, None] < S) & (offs_d[None, :] < D)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for h in range(H):
            q = tl.load(q_ptrs + h * sqh, mask=q_mask, other=0.0)
            w = tl.load(w_ptrs + h * swh, mask=offs_m < S, other=0.0).to(tl.float32)
            logits = _dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PREC)
            acc += w[:, None] * tl.maximum(logits, 0.0)
        if HAS_BIAS:
            bias = tl.load(BIAS + b * sbb + rows[:, None] * sbs + offs_n[None, :] * sbt, mask=io_mask, other=0.0)
            acc += bias.to(tl.float32)
        rel = offs_n[None, :] - offs_m[:, None]
        acc = tl.where((rel >= lower) & (rel <= upper), acc, float("-inf"))
        tl.store(out_ptrs, acc, mask=io_mask)


@triton.jit
def _scores_bwd_dq(Q, K, W, G, DQ, DW, S, T, D,
                   sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sgb, sgs, sgt,
                   sdqb, sdqs, sdqh, sdqd, sdwb, sdws, sdwh,
                   lower, upper, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    rows = offs_m.to(tl.int64)
    q_mask = (offs_m[:, None] < S) & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + rows[:, None] * sqs + h * sqh + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    w = tl.load(W + b * swb + rows * sws + h * swh, mask=offs_m < S, other=0.0).to(tl.float32)
    dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    dw = tl.zeros((BLOCK_M,), tl.float32)
    lo, _full_lo, _full_hi, hi = _visit_range(m0, BLOCK_M, T, BLOCK_N, lower, upper)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(K + b * skb + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :] * skd,
                    mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0)
        logits = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PREC)
        rel = offs_n[None, :] - offs_m[:, None]
        keep = (offs_m[:, None] < S) & (offs_n[None, :] < T) & (rel >= lower) & (rel <= upper)
        g = tl.load(G + b * sgb + rows[:, None] * sgs + offs_n[None, :] * sgt, mask=keep, other=0.0).to(tl.float32)
        dw += tl.sum(g * tl.maximum(logits, 0.0), axis=1)
        dlogits = tl.where(logits > 0, g * w[:, None], 0.0)
        dq = _dot(dlogits.to(k.dtype), k, dq, PREC)
    tl.store(DQ + b * sdqb + rows[:, None] * sdqs + h * sdqh + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)
    tl.store(DW + b * sdwb + rows * sdws + h * sdwh, dw.to(DW.dtype.element_ty), mask=offs_m < S)


@triton.jit
def _scores_bwd_dk(Q, K, W, G, DK, S, T, H, D,
                   sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sgb, sgs, sgt, sdkb, sdkt, sdkd,
                   lower, upper, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    keys = offs_n.to(tl.int64)
    k_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    k = tl.load(K + b * skb + keys[:, None] * skt + offs_d[None, :] * skd, mask=k_mask, other=0.0)
    kt = tl.trans(k)
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    # queries s with lower <= t - s <= upper, i.e. -upper <= s - t <= -lower
    lo, _full_lo, _full_hi, hi = _visit_range(n0, BLOCK_N, S, BLOCK_M, -upper, -lower)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        rel = offs_n[None, :] - offs_m[:, None]
        keep = (offs_m[:, None] < S) & (offs_n[None, :] < T) & (rel >= lower) & (rel <= upper)
        g = tl.load(G + b * sgb + rows[:, None] * sgs + offs_n[None, :] * sgt, mask=keep, other=0.0).to(tl.float32)
        q_ptrs = Q + b * sqb + rows[:, None] * sqs + offs_d[None, :] * sqd
        w_ptrs = W + b * swb + rows * sws
        q_mask = (offs_m[:, None] < S) & (offs_d[None, :] < D)
        for h in range(H):
            q = tl.load(q_ptrs + h * sqh, mask=q_mask, other=0.0)
            w = tl.load(w_ptrs + h * swh, mask=offs_m < S, other=0.0).to(tl.float32)
            logits = _dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PREC)
            dlogits = tl.where(logits > 0, g * w[:, None], 0.0)
            dk = _dot(tl.trans(dlogits.to(q.dtype)), q, dk, PREC)
    tl.store(DK + b * sdkb + keys[:, None] * sdkt + offs_d[None, :] * sdkd, dk.to(DK.dtype.element_ty), mask=k_mask)


def triton_unsupported_reason(q, k, weights, *, bias=None, lower=None, upper=None, topk=None) -> Optional[str]:
    """None when the Triton kernels can serve the call, else a one-line reason."""
    for name, t in (("q", q), ("k", k), ("weights", weights)):
        if t.dtype not in _DTYPES:
            return f"{name} dtype {str(t.dtype).removeprefix('torch.')} (the triton kernels take float16, " \
                   "bfloat16, float32)"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {_MAX_HEAD_DIM}"
    return triton_device_reason((q, k, weights, bias), _INTERPRET, "triton indexer kernels")


def _prepare(q, k, weights, bias, lower, upper, topk=None):
    check_indexer_args(q, k, weights, bias=bias, topk=topk)
    reason = triton_unsupported_reason(q, k, weights, bias=bias, lower=lower, upper=upper)
    if reason is not None:
        raise ValueError(f"indexer triton kernels cannot serve this call: {reason}")
    dtype = torch.promote_types(q.dtype, k.dtype)  # tl.dot takes one dtype
    # Contiguous operands keep every int32 index * stride product in the kernels below 2**31 (a
    # permuted q has a head stride of S*D; rows and keys are widened to int64 where they meet S*T).
    q, k = q.to(dtype).contiguous(), k.to(dtype).contiguous()
    lower = -_BIG if lower is None else max(-_BIG, min(_BIG, lower))
    upper = _BIG if upper is None else max(-_BIG, min(_BIG, upper))
    meta = dict(PREC="ieee" if dtype == torch.float32 else "tf32", BLOCK_M=_BLOCK, BLOCK_N=_BLOCK,
                D_PAD=max(16, triton.next_power_of_2(q.shape[-1])))
    return q, k, lower, upper, meta


def _launch_scores(q, k, weights, bias, lower, upper, meta, out):
    batch, seq, heads, dim = q.shape
    keys = k.shape[1]
    if bias is not None:
        bias = bias.contiguous()  # compact (broadcast dims stay size 1); key stride 1
    bias_strides = (0, 0, 0) if bias is None else bias.expand(batch, seq, keys).stride()
    grid = (triton.cdiv(seq, _BLOCK), triton.cdiv(keys, _BLOCK), batch)
    _scores_fwd[grid](q, k, weights, out if bias is None else bias, out, seq, keys, heads, dim,
                      *q.stride(), *k.stride(), *weights.stride(), *bias_strides, *out.stride(),
                      lower, upper, HAS_BIAS=bias is not None, **meta)
    return out


def indexer_scores_triton(q, k, weights, *, bias=None, lower=None, upper=None):
    q, k, lower, upper, meta = _prepare(q, k, weights, bias, lower, upper)
    out = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float32, device=q.device)
    return _launch_scores(q, k, weights, bias, lower, upper, meta, out)


def indexer_scores_triton_backward(q, k, weights, dscores, *, lower=None, upper=None):
    q_in, k_in = q, k
    q, k, lower, upper, meta = _prepare(q, k, weights, None, lower, upper)
    batch, seq, heads, dim = q.shape
    keys = k.shape[1]
    dscores = dscores.contiguous()  # key stride 1 (a transposed one would be S: T*S overflows int32)
    dq, dk, dweights = torch.empty_like(q), torch.empty_like(k), torch.empty_like(weights)
    _scores_bwd_dq[(triton.cdiv(seq, _BLOCK), heads, batch)](
        q, k, weights, dscores, dq, dweights, seq, keys, dim, *q.stride(), *k.stride(), *weights.stride(),
        *dscores.stride(), *dq.stride(), *dweights.stride(), lower, upper, **meta)
    _scores_bwd_dk[(triton.cdiv(keys, _BLOCK), batch)](
        q, k, weights, dscores, dk, seq, keys, heads, dim, *q.stride(), *k.stride(), *weights.stride(),
        *dscores.stride(), *dk.stride(), lower, upper, **meta)
    return dq.to(q_in.dtype), dk.to(k_in.dtype), dweights


def indexer_topk_triton(q, k, weights, *, topk, bias=None, lower=None, upper=None):
    q, k, lower, upper, meta = _prepare(q, k, weights, bias, lower, upper, topk)
    batch, seq = q.shape[:2]
    keys = k.shape[1]
    full_bias = None if bias is None else bias.expand(batch, seq, keys)
    values = torch.empty(batch, seq, topk, dtype=torch.float32, device=q.device)
    indices = torch.empty(batch, seq, topk, dtype=torch.int64, device=q.device)
    buffer = torch.empty(batch, min(seq, _TOPK_ROWS), keys, dtype=torch.float32, device=q.device)
    for start in range(0, seq, _TOPK_ROWS):
        rows = slice(start, min(seq, start + _TOPK_ROWS))
        n = rows.stop - start
        # the chunk numbers its rows from 0: lower <= t - s <= upper <=> lower + start <= t - i <= upper + start
        scores = _launch_scores(q[:, rows], k, weights[:, rows], None if full_bias is None else full_bias[:, rows],
                                min(_BIG, lower + start), min(_BIG, upper + start), meta, buffer[:, :n])
        values[:, rows], indices[:, rows] = torch.topk(scores, topk, dim=-1)
    return values, indices
