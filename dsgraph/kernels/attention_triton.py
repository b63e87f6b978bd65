"""Triton flash attention for ``dsgraph::attention`` (forward and backward).

Same semantics as ``attention_ref`` (see there) except index (top-k) masks. Flash-attention v2
structure, after the Triton tutorial "fused attention": the forward keeps a running max/sum per
query row in base 2; the backward recomputes p from the saved lse in two kernels, dk/dv over key
blocks (looping over the query heads of a GQA group, so no atomics) and dq over query blocks.

- Band masks: a program visits only the blocks that intersect its band; blocks entirely inside
  the band (and the bounds) skip the per-element mask, edge blocks apply it.
- Sink: the running max/sum start at (sink, 1), so the sink column is in the normalisation.
- GQA: kv head = h // group, by index arithmetic. Bias: read through (stride-0) strides.
- Head dims are padded to a power of two (>= 16) with masked loads; loads are bounds-masked.
- fp16/bf16 feed the tensor cores (p and ds are rounded to the input dtype, as in every flash
  kernel); fp32 uses ``input_precision="ieee"``, never tf32.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_ref import check_attention_args
from .common import triton_device_reason

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_HEAD_DIM = 256
_BIG = 1 << 30  # stands for an unbounded band side; keeps band arithmetic in int32
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The interpreter multiplies bfloat16 bit patterns as integers in tl.dot: feed it fp32 there.
_DOT_IN_FP32 = tl.constexpr(_INTERPRET)


def _configs(gpu: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) on GPU; one small block under the interpreter."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


# (BLOCK_M, BLOCK_N, warps, stages) for H100, bf16, D=128; the last of each list is the small tile
# that _prune keeps alone where big tiles do not fit (fp32 dots run on FMA units, head dims > 128).
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)])
_DKDV_CONFIGS = _configs([(64, 128, 8, 3), (32, 128, 4, 3), (32, 64, 4, 2)])
_DQ_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2)])


def _prune(configs, named_args, **kwargs):
    if named_args["Q"].dtype == torch.float32 or max(kwargs["D_PAD"], kwargs["DV_PAD"]) > 128:
        return configs[-1:]
    return configs


# Lengths enter the key as powers of two so that varying lengths do not re-tune each call; W_KEY is
# the most keys a query row can see (a sliding window wants other tiles than causal at the same S).
_KEY = ["S_KEY", "T_KEY", "W_KEY", "D", "DV", "HAS_BIAS"]
_PRUNE = {"early_config_prune": _prune}


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    if _DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _visit_range(o0, BO: tl.constexpr, n, BI: tl.constexpr, rel_lo, rel_hi):
    """Inner index x in [0, n) against outer block [o0, o0 + BO), pairs allowed iff
    rel_lo <= x - o <= rel_hi. Blocks of x in [lo, hi) can hold allowed pairs; those in
    [full_lo, full_hi) hold only allowed, in-bounds pairs and skip the element mask."""
    lo = tl.maximum(o0 + rel_lo, 0) // BI * BI
    hi = tl.maximum(tl.minimum(o0 + BO + rel_hi, n), lo)
    full_lo = (tl.maximum(o0 + BO - 1 + rel_lo, 0) + BI - 1) // BI * BI
    full_hi = tl.maximum(tl.minimum(o0 + rel_hi + 1, n), 0) // BI * BI
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _finish_scores(s, i, j, bias_base, S, T, sbm, sbn, lower, upper,
                   HAS_BIAS: tl.constexpr, MASK: tl.constexpr):
    """Base-2 scores: add the bias and, on edge blocks, -inf outside the band and the keys.
    ``i``/``j`` are the broadcastable query/key indices of ``s``."""
    if HAS_BIAS:
        bias = tl.load(bias_base + i * sbm + j * sbn, mask=(i < S) & (j < T), other=0.0)
        s += bias.to(tl.float32) * LOG2E
    if MASK:
        rel = j - i
        s = tl.where((rel >= lower) & (rel <= upper) & (j < T), s, float("-inf"))
    return s


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_base, v_base, bias_base, n0, offs_m, offs_d, offs_dv, S, T,
              skn, skd, svn, svd, sbm, sbn, qk_scale, lower, upper,
              D: tl.constexpr, DV: tl.constexpr, HAS_BIAS: tl.constexpr, MASK: tl.constexpr,
              PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    s = _dot(q, tl.trans(k), None, PREC) * qk_scale
    s = _finish_scores(s, offs_m[:, None], offs_n[None, :], bias_base, S, T, sbm, sbn, lower, upper,
                       HAS_BIAS, MASK)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing allowed so far keeps m = -inf: shift by 0 so that p = 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=(offs_n[:, None] < T) & (offs_dv[None, :] < DV), other=0.0)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PREC)
    return acc, m_new, l_i


@triton.jit
def _query_tile(Q, sqb, sqh, sqm, sqd, Hq, G, S, D: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """A query-block program's batch, query head, kv head, first row, offsets and q tile. The last
    query block runs first: under a causal band it is the longest, which shortens the tail."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    kvh = (h // G).to(tl.int64)
    h = h.to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    return b, h, kvh, m0, offs_m, offs_d, offs_dv, q


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _fwd_kernel(Q, K, V, SINK, BIAS, OUT, LSE,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sbb, sbh, sbm, sbn, sob, soh, som, sod,
                Hq, G, S, T, qk_scale, lower, upper, S_KEY, T_KEY, W_KEY,
                D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                HAS_SINK: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, h, kvh, m0, offs_m, offs_d, offs_dv, q = _query_tile(Q, sqb, sqh, sqm, sqd, Hq, G, S, D, D_PAD, DV_PAD,
                                                            BLOCK_M)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    bias_base = BIAS + b * sbb + h * sbh
    if HAS_SINK:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SINK + h).to(tl.float32) * LOG2E
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _visit_range(m0, BLOCK_M, T, BLOCK_N, lower, upper)
    for n0 in range(lo, full_lo, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, bias_base, n0, offs_m, offs_d,
                                  offs_dv, S, T, skn, skd, svn, svd, sbm, sbn, qk_scale, lower, upper,
                                  D, DV, HAS_BIAS, True, PREC, BLOCK_N)
    for n0 in range(full_lo, full_hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, bias_base, n0, offs_m, offs_d,
                                  offs_dv, S, T, skn, skd, svn, svd, sbm, sbn, qk_scale, lower, upper,
                                  D, DV, HAS_BIAS, False, PREC, BLOCK_N)
    for n0 in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, bias_base, n0, offs_m, offs_d,
                                  offs_dv, S, T, skn, skd, svn, svd, sbm, sbn, qk_scale, lower, upper,
                                  D, DV, HAS_BIAS, True, PREC, BLOCK_N)
    # No allowed key and no sink: l = 0 and m = -inf give out = 0/0 = NaN, lse = -inf (as eager).
    out = acc / l_i[:, None]
    row_ok = offs_m < S
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + tl.program_id(1).to(tl.int64) * S + offs_m, (m_i + tl.math.log2(l_i)) * LN2, mask=row_ok)


@triton.jit
def _bwd_prep_kernel(OUT, DOUT, LSE, DELTA, LSE2, sob, soh, som, sod, sdb, sdh, sdm, sdd, Hq, S,
                     DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dout * out) and lse in base 2; rows with nothing allowed (lse = -inf) get
    delta = 0 and lse2 = +inf so that their p and ds are 0 rather than NaN."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, DV_PAD)
    o = tl.load(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
                mask=(offs_m[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    do = tl.load(DOUT + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                mask=(offs_m[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = pid_bh.to(tl.int64) * S + offs_m
    lse = tl.load(LSE + row, mask=offs_m < S, other=0.0)
    empty = lse == float("-inf")
    tl.store(DELTA + row, tl.where(empty, 0.0, delta), mask=offs_m < S)
    tl.store(LSE2 + row, tl.where(empty, float("inf"), lse * LOG2E), mask=offs_m < S)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, bias_base, lse2_base, delta_base, m0, offs_n, offs_d,
               offs_dv, S, T, sqm, sqd, sdm, sdd, sbm, sbn, qk_scale, lower, upper,
               D: tl.constexpr, DV: tl.constexpr, HAS_BIAS: tl.constexpr, MASK: tl.constexpr,
               PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    # Transposed tiles ([keys, queries]) so that dk and dv accumulate without transposes.
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                mask=(offs_m[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    # Rows past S read lse2 = +inf and delta = 0: their p and ds vanish.
    lse2 = tl.load(lse2_base + offs_m, mask=offs_m < S, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=offs_m < S, other=0.0)
    s_t = _dot(k, tl.trans(q), None, PREC) * qk_scale
    s_t = _finish_scores(s_t, offs_m[None, :], offs_n[:, None], bias_base, S, T, sbm, sbn, lower, upper,
                         HAS_BIAS, MASK)
    p_t = tl.math.exp2(s_t - lse2[None, :])
    dv = _dot(p_t.to(do.dtype), do, dv, PREC)
    dp_t = _dot(v, tl.trans(do), None, PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _dot(ds_t.to(q.dtype), q, dk, PREC)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, BIAS, DOUT, LSE2, DELTA, DK, DVAL,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     sbb, sbh, sbm, sbn, sdb, sdh, sdm, sdd,
                     sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                     Hq, Hkv, G, S, T, qk_scale, scale, lower, upper, S_KEY, T_KEY, W_KEY,
                     D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = (pid_bh % Hkv).to(tl.int64)
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=(offs_n[:, None] < T) & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], dtype=tl.float32)
    # lower <= j - i <= upper  <=>  -upper <= i - j <= -lower: the same range helper, roles swapped.
    lo, full_lo, full_hi, hi = _visit_range(n0, BLOCK_N, S, BLOCK_M, -upper, -lower)
    for g in range(0, G):
        h = kvh * G + g
        q_base = Q + b * sqb + h * sqh
        do_base = DOUT + b * sdb + h * sdh
        bias_base = BIAS + b * sbb + h * sbh
        row = (b * Hq + h) * S
        for m0 in range(lo, full_lo, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, bias_base, LSE2 + row, DELTA + row, m0,
                                offs_n, offs_d, offs_dv, S, T, sqm, sqd, sdm, sdd, sbm, sbn, qk_scale,
                                lower, upper, D, DV, HAS_BIAS, True, PREC, BLOCK_M)
        for m0 in range(full_lo, full_hi, BLOCK_M):
            m0 = tl.multiple_of(m0, BLOCK_M)
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, bias_base, LSE2 + row, DELTA + row, m0,
                                offs_n, offs_d, offs_dv, S, T, sqm, sqd, sdm, sdd, sbm, sbn, qk_scale,
                                lower, upper, D, DV, HAS_BIAS, False, PREC, BLOCK_M)
        for m0 in range(full_hi, hi, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, bias_base, LSE2 + row, DELTA + row, m0,
                                offs_n, offs_d, offs_dv, S, T, sqm, sqd, sdm, sdd, sbm, sbn, qk_scale,
                                lower, upper, D, DV, HAS_BIAS, True, PREC, BLOCK_M)
    row_ok = offs_n[:, None] < T
    tl.store(DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             (dk * scale).to(DK.dtype.element_ty), mask=row_ok & (offs_d[None, :] < D))
    tl.store(DVAL + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DVAL.dtype.element_ty), mask=row_ok & (offs_dv[None, :] < DV))


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_base, v_base, bias_base, n0, offs_m, offs_d, offs_dv, S, T,
             skn, skd, svn, svd, sbm, sbn, qk_scale, lower, upper,
             D: tl.constexpr, DV: tl.constexpr, HAS_BIAS: tl.constexpr, MASK: tl.constexpr,
             PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=(offs_n[:, None] < T) & (offs_dv[None, :] < DV), other=0.0)
    s = _dot(q, tl.trans(k), None, PREC) * qk_scale
    s = _finish_scores(s, offs_m[:, None], offs_n[None, :], bias_base, S, T, sbm, sbn, lower, upper,
                       HAS_BIAS, MASK)
    p = tl.math.exp2(s - lse2[:, None])
    dp = _dot(do, tl.trans(v), None, PREC)
    ds = p * (dp - delta[:, None])
    return _dot(ds.to(k.dtype), k, dq, PREC)


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _bwd_dq_kernel(Q, K, V, BIAS, DOUT, LSE2, DELTA, DQ,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sbb, sbh, sbm, sbn, sdb, sdh, sdm, sdd, sdqb, sdqh, sdqm, sdqd,
                   Hq, G, S, T, qk_scale, scale, lower, upper, S_KEY, T_KEY, W_KEY,
                   D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, h, kvh, m0, offs_m, offs_d, offs_dv, q = _query_tile(Q, sqb, sqh, sqm, sqd, Hq, G, S, D, D_PAD, DV_PAD,
                                                            BLOCK_M)
    do = tl.load(DOUT + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                mask=(offs_m[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    row = tl.program_id(1).to(tl.int64) * S + offs_m  # (b, h) row of lse2 and delta
    lse2 = tl.load(LSE2 + row, mask=offs_m < S, other=float("inf"))
    delta = tl.load(DELTA + row, mask=offs_m < S, other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    bias_base = BIAS + b * sbb + h * sbh
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _visit_range(m0, BLOCK_M, T, BLOCK_N, lower, upper)
    for n0 in range(lo, full_lo, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, bias_base, n0, offs_m, offs_d, offs_dv,
                      S, T, skn, skd, svn, svd, sbm, sbn, qk_scale, lower, upper,
                      D, DV, HAS_BIAS, True, PREC, BLOCK_N)
    for n0 in range(full_lo, full_hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, bias_base, n0, offs_m, offs_d, offs_dv,
                      S, T, skn, skd, svn, svd, sbm, sbn, qk_scale, lower, upper,
                      D, DV, HAS_BIAS, False, PREC, BLOCK_N)
    for n0 in range(full_hi, hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, bias_base, n0, offs_m, offs_d, offs_dv,
                      S, T, skn, skd, svn, svd, sbm, sbn, qk_scale, lower, upper,
                      D, DV, HAS_BIAS, True, PREC, BLOCK_N)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=(offs_m[:, None] < S) & (offs_d[None, :] < D))


def _span(t: torch.Tensor) -> int:
    """Largest element offset inside one [rows, cols] head: kernels index heads in int32."""
    return sum((n - 1) * abs(st) for n, st in zip(t.shape[-2:], t.stride()[-2:]))


def triton_unsupported_reason(q, k, v, *, scale=None, sink=None, bias=None, lower=None, upper=None,
                              topk=None) -> Optional[str]:
    """None when the Triton kernel can serve the call, else a one-line reason."""
    if topk is not None:
        return "topk index masks are not supported by the triton attention kernel"
    if q.dtype not in _DTYPES:
        dtype = str(q.dtype).removeprefix("torch.")
        return f"dtype {dtype} (the triton kernel takes float16, bfloat16, float32)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    dim = max(q.shape[-1], v.shape[-1])
    if dim > _MAX_HEAD_DIM:
        return f"head dim {dim} > {_MAX_HEAD_DIM}"
    if q.dtype == torch.float32 and dim > 128 and not _INTERPRET:  # ieee fp32 tiles overflow shared memory
        return f"float32 with head dim {dim} > 128"
    reason = triton_device_reason((q, k, v, sink, bias), _INTERPRET, "triton attention kernel")
    if reason is not None:
        return reason
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if max(_span(t) for t in (q, k, v, bias) if t is not None) >= 2**31:
        return "a head spans more than 2**31 elements (int32 indexing)"
    return None


def _prepare(q, k, v, sink, bias, lower, upper):
    """Validate, then the launch arguments shared by the kernels."""
    check_attention_args(q, k, v, sink=sink, bias=bias)
    reason = triton_unsupported_reason(q, k, v, sink=sink, bias=bias, lower=lower, upper=upper)
    if reason is not None:
        raise ValueError(f"attention_triton cannot serve this call: {reason}")
    batch, hq, seq, dim = q.shape
    keys, dim_v = k.shape[2], v.shape[3]
    has_bias = bias is not None
    lower = -_BIG if lower is None else max(-_BIG, min(_BIG, lower))
    upper = _BIG if upper is None else max(-_BIG, min(_BIG, upper))
    width = min(keys, min(upper, keys - 1) - max(lower, -(seq - 1)) + 1)  # keys one row can see
    if not has_bias:
        bias, bias_strides = q, (0, 0, 0, 0)  # never read (HAS_BIAS is False)
    else:
        bias = bias.expand(batch, hq, seq, keys)  # stride 0 on broadcast dims, nothing materialised
        bias_strides = bias.stride()
    return dict(
        bias=bias, bias_strides=bias_strides,
        band=(lower, upper),
        tune_keys=tuple(triton.next_power_of_2(max(1, n)) for n in (seq, keys, width)),
        meta=dict(D=dim, DV=dim_v, D_PAD=max(16, triton.next_power_of_2(dim)),
                  DV_PAD=max(16, triton.next_power_of_2(dim_v)), HAS_BIAS=has_bias,
                  PREC="ieee" if q.dtype == torch.float32 else "tf32"))


def attention_triton(q, k, v, *, scale: float, sink=None, bias=None, lower=None, upper=None):
    """Returns (out [B, Hq, S, Dv] in q.dtype, lse [B, Hq, S] fp32)."""
    prep = _prepare(q, k, v, sink, bias, lower, upper)
    batch, hq, seq, _ = q.shape
    hkv, keys = k.shape[1], k.shape[2]
    out = q.new_empty(batch, hq, seq, v.shape[3])
    lse = torch.empty(batch, hq, seq, dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * hq)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, q if sink is None else sink.contiguous(), prep["bias"], out, lse,
        *q.stride(), *k.stride(), *v.stride(), *prep["bias_strides"], *out.stride(),
        hq, hq // hkv, seq, keys, scale * LOG2E.value, *prep["band"], *prep["tune_keys"],
        HAS_SINK=sink is not None, **prep["meta"])
    return out, lse


def attention_triton_backward(q, k, v, out, lse, dout, *, scale: float, sink=None, bias=None, lower=None,
                              upper=None):
    """Returns (dq, dk, dv, dsink); dsink is None without a sink."""
    prep = _prepare(q, k, v, sink, bias, lower, upper)
    if out.shape != (*q.shape[:3], v.shape[3]) or dout.shape != out.shape:
        raise ValueError(f"out {tuple(out.shape)} and dout {tuple(dout.shape)} must be [B, Hq, S, Dv] = "
                         f"{(*q.shape[:3], v.shape[3])}")
    dout = dout.to(q.dtype)  # the tensor-core products take one dtype
    batch, hq, seq, _ = q.shape
    hkv, keys = k.shape[1], k.shape[2]
    meta = prep["meta"]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = (torch.zeros if seq == 0 else torch.empty)(k.shape, dtype=k.dtype, device=k.device)
    dv = (torch.zeros if seq == 0 else torch.empty)(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty(batch, hq, seq, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    if delta.numel():
        block = 16 if _INTERPRET else 64
        _bwd_prep_kernel[(triton.cdiv(seq, block), batch * hq)](
            out, dout, lse.contiguous(), delta, lse2, *out.stride(), *dout.stride(), hq, seq,
            DV=meta["DV"], DV_PAD=meta["DV_PAD"], BLOCK_M=block)
        common = (*prep["bias_strides"], *dout.stride())
        scalars = (scale * LOG2E.value, scale, *prep["band"], *prep["tune_keys"])
        if keys:
            _bwd_dkdv_kernel[lambda m: (triton.cdiv(keys, m["BLOCK_N"]), batch * hkv)](
                q, k, v, prep["bias"], dout, lse2, delta, dk, dv,
                *q.stride(), *k.stride(), *v.stride(), *common, *dk.stride(), *dv.stride(),
                hq, hkv, hq // hkv, seq, keys, *scalars, **meta)
        _bwd_dq_kernel[lambda m: (triton.cdiv(seq, m["BLOCK_M"]), batch * hq)](
            q, k, v, prep["bias"], dout, lse2, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *common, *dq.stride(),
            hq, hq // hkv, seq, keys, *scalars, **meta)
    dsink = None
    if sink is not None:  # d lse / d sink = p_sink = exp(sink - lse); dsink = -sum(p_sink * delta)
        dsink = -(torch.exp(sink.float()[None, :, None] - lse) * delta).sum((0, 2)).to(sink.dtype)
    return dq, dk, dv, dsink
