"""TileLang (Hopper, sm_90a) flash attention for ``dsgraph::attention``, forward and backward.

Semantics: ``dsgraph/ops/attention.py``; oracle: ``dsgraph/kernels/attention_ref.py``. Served:
bf16/fp16 q/k/v [B, H, S, D] with (D, Dv) in ``HEAD_DIMS``, a band ``lower <= j - i <= upper``
(causal, sliding window, none), a per-head sink, GQA. Not served (the reason says so, the policy
takes the next backend): bias, top-k index masks, fp32, other head dims, non-CUDA or non-sm_90.

Forward (FlashAttention-2/3 schedule, one CTA = ``block_m`` query rows of one head): q stays in
shared memory; the key/value tiles of the band are streamed by ``T.Pipelined`` (TMA loads, which
TileLang's producer/consumer pass gives to a producer warpgroup); S = Q K^T and O += P V run on
wgmma with fp32 accumulators; the online softmax keeps a running max/sum in base 2.
- Band: only the key blocks meeting the band of the CTA's rows are visited; the score tile starts
  at 0 or -inf per element (band, keys past T) and the product accumulates onto it.
- Sink: the running max/sum start at (sink, 1), so the sink column is in the normalisation.
- GQA: kv head = h // (Hq // Hkv), by index arithmetic; keys are never repeated.
- Rows without any allowed key and no sink give out = NaN, lse = -inf (the reference's eager
  softmax semantics); with a sink out = 0, lse = sink.
- The last query block runs first: under a causal band it is the longest, which shortens the tail.

Backward (the FlashAttention-2 split): a prep kernel computes delta = rowsum(O * dO) and
lse2 = lse * log2(e) (+inf on empty rows, so their P is 0); the dK/dV kernel (one CTA = ``block_n``
keys of one kv head) walks the query blocks of the band for every query head of the GQA group in one
pipelined loop, in transposed [keys, queries] tiles so that dV += P^T dO and dK += dS^T Q need no
transposes. A separate dQ kernel (one CTA = ``block_n`` query rows) walks the key blocks of the band
and recomputes P and dP (7 GEMMs in all), so dQ is deterministic. FlashAttention-3's schedule (the
dK/dV kernel also forms dQ = dS K and TMA reduce-adds it into an fp32 buffer: 5 GEMMs, summation
order not fixed) was tried and measured no faster (below), so the deterministic split is kept.
dsink = -sum(exp(sink - lse) * delta) is a torch reduction.

Tiles, stages and threads are ``FwdConfig`` / ``BwdConfig``; ``CONFIGS`` holds the defaults by head
dim and band kind, and both entry points take an explicit ``config``.

Measured on an H100 (benchmarks/attention_tilelang_sweep.py; bf16 B=1 Hq=32 Hkv=8 S=8192 D=128), causal /
window 1024 + sink, ms. Forward: 128x128 s2 (default) 1.111 (495 TFLOP/s) / 0.345; s1 1.116 / 0.350;
128x64 1.312 / 0.404; 192x128 3wg 1.122 / 0.365; SDPA (causal) 0.874. Forward+backward: dQ kernel
64x128 s2 (default) 5.068 / 1.452; SDPA (causal) 3.603. The FA3 atomic dQ: 64x128 s2 5.051 / 1.496,
s1 5.409 / 1.560, 32x128 7.074 / 1.982, 64x64 1wg 6.833 / 2.070.

Compiled kernels are cached per (head dims, dtype, sink, config): batch, heads and lengths are dynamic, so
one build serves every shape. ``tilelang`` is imported lazily: importing this module never fails.
"""
# No `from __future__ import annotations`: TileLang evaluates the prim_funcs' annotations, which
# name the builders' local dynamic shapes.
import dataclasses
import functools
import math
from typing import Optional

import torch

from .attention_ref import check_attention_args
from .common import tilelang_device_reason

TARGET = {"kind": "cuda", "arch": "sm_90a"}
HEAD_DIMS = ((64, 64), (128, 128))  # (D, Dv) compiled for (MLA's 192/128 fails TileLang's lowering)
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_MAX_GRID_YZ = 65535  # CUDA's grid y/z limit: heads and batch


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """Forward tiles: ``block_m`` query rows per CTA over ``threads // 128`` consumer warpgroups (each
    owns ``block_m / warpgroups`` rows: a multiple of 64, wgmma's M), ``block_n`` keys per pipelined
    step, ``stages`` K/V buffers in flight."""
    block_m: int = 128
    block_n: int = 128
    threads: int = 256
    stages: int = 2

    def __post_init__(self):
        _check_tiles(self, "FwdConfig")


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    """Backward tiles. dK/dV kernel: ``block_n`` keys per CTA against ``block_m`` query rows per
    pipelined step; dQ kernel: ``block_n`` query rows per CTA against ``block_m`` keys per step."""
    block_m: int = 64
    block_n: int = 128
    threads: int = 256
    stages: int = 2

    def __post_init__(self):
        _check_tiles(self, "BwdConfig")


def _check_tiles(cfg, name):
    for field in ("block_m", "block_n"):
        value = getattr(cfg, field)
        if value not in (16, 32, 64, 128, 192, 256):
            raise ValueError(f"{name}.{field}={value}: expected 16, 32, 64, 128, 192 or 256")
    if cfg.threads not in (128, 256, 384):
        raise ValueError(f"{name}.threads={cfg.threads}: expected 128, 256 or 384 (1 to 3 consumer warpgroups)")
    if not 1 <= cfg.stages <= 4:
        raise ValueError(f"{name}.stages={cfg.stages}: expected 1 to 4")


# Defaults by (head dim, band kind): "window" is a band at most _WINDOW_KEYS keys wide (sliding windows,
# short sequences), "wide" anything else (long causal, no mask). Tuned with
# benchmarks/attention_tilelang_sweep.py on an H100, 2026-11 (D=128, both kinds: the defaults won; see the
# module docstring); D=64 was not swept and takes the same tiles.
_WINDOW_KEYS = 2048
CONFIGS = {
    (64, "window"): (FwdConfig(), BwdConfig()),
    (64, "wide"): (FwdConfig(), BwdConfig()),
    (128, "window"): (FwdConfig(), BwdConfig()),
    (128, "wide"): (FwdConfig(), BwdConfig()),
}


def default_configs(dim: int, lower: int, upper: int) -> tuple[FwdConfig, BwdConfig]:
    """The table's (forward, backward) configs for head dim ``dim`` and a clamped band."""
    return CONFIGS[dim, "window" if upper - lower + 1 <= _WINDOW_KEYS else "wide"]


def _band_blocks(T, o0, o_last, rel_lo, rel_hi, n, block):
    """Inner blocks [lo, hi) of size ``block`` over [0, n) holding an x with
    rel_lo <= x - o <= rel_hi for some outer index o in [o0, o_last] (rel_lo <= rel_hi)."""
    x_lo = T.max(o0 + rel_lo, 0)
    x_hi = T.min(o_last + rel_hi + 1, n)
    lo = x_lo // block
    return lo, T.if_then_else(x_hi > x_lo, T.ceildiv(x_hi, block), lo)


def _visited_blocks(T, o0, o_last, rel_lo, rel_hi, n, block):
    """``_band_blocks``, but at least one block: the TMA loads issued before the loop are waited for
    inside it, and their shared memory is reused by the epilogue. An empty band's one block is wholly
    masked (zero-filled past the end), which gives the empty-band result."""
    lo, hi = _band_blocks(T, o0, o_last, rel_lo, rel_hi, n, block)
    return lo, T.max(hi, lo + 1)


def _interior(m0, bm, n0, bn, lower, upper, keys):
    """Whether every pair of query rows [m0, m0 + bm) x keys [n0, n0 + bn) is allowed and the keys in
    bounds (such blocks skip the per-element mask; the backward also needs m0 + bm <= S, since its
    rows past S read lse2 = 0 rather than a masked score)."""
    return (n0 - (m0 + bm - 1) >= lower) & (n0 + bn - 1 - m0 <= upper) & (n0 + bn <= keys)


def clamp_band(lower, upper, seq: int, keys: int) -> tuple[int, int]:
    """(lower, upper) as int32-safe bounds allowing the same pairs of [0, seq) x [0, keys): a side past
    every pair (or None) becomes -seq / keys, so the kernels' band arithmetic stays small."""
    lower = -seq if lower is None else max(-seq, min(keys, lower))
    upper = keys if upper is None else max(-seq, min(keys, upper))
    return lower, upper


@functools.lru_cache(maxsize=None)
def _fwd_kernel(dim: int, dim_v: int, dtype: str, has_sink: bool, cfg: FwdConfig = FwdConfig()):
    import tilelang
    import tilelang.language as T

    bm, bn = cfg.block_m, cfg.block_n
    acc_t = "float32"
    batch, hq, hkv, seq, keys = (T.dynamic(n) for n in ("B", "HQ", "HKV", "S", "T"))

    @T.prim_func
    def fwd(Q: T.Tensor((batch, hq, seq, dim), dtype),
            K: T.Tensor((batch, hkv, keys, dim), dtype),
            V: T.Tensor((batch, hkv, keys, dim_v), dtype),
            Sink: T.Tensor((hq,), acc_t),  # natural-log logits (unread without a sink)
            Out: T.Tensor((batch, hq, seq, dim_v), dtype),
            Lse: T.Tensor((batch, hq, seq), acc_t),
            scale_log2: T.float32, lower: T.int32, upper: T.int32):
        with T.Kernel(T.ceildiv(seq, bm), hq, batch, threads=cfg.threads) as (bx, h, b):
            q_s = T.alloc_shared((bm, dim), dtype)
            k_s = T.alloc_shared((bn, dim), dtype)
            v_s = T.alloc_shared((bn, dim_v), dtype)
            o_s = T.alloc_shared((bm, dim_v), dtype)
            acc_s = T.alloc_fragment((bm, bn), acc_t)
            p = T.alloc_fragment((bm, bn), dtype)
            acc_o = T.alloc_fragment((bm, dim_v), acc_t)
            m_i = T.alloc_fragment((bm,), acc_t)  # running max of the base-2 scores
            m_prev = T.alloc_fragment((bm,), acc_t)
            m_use = T.alloc_fragment((bm,), acc_t)
            alpha = T.alloc_fragment((bm,), acc_t)
            l_i = T.alloc_fragment((bm,), acc_t)
            row_sum = T.alloc_fragment((bm,), acc_t)
            lse = T.alloc_fragment((bm,), acc_t)

            kvh = h // (hq // hkv)
            m0 = (T.ceildiv(seq, bm) - 1 - bx) * bm  # longest (causal) blocks first
            lo, hi = _visited_blocks(T, m0, T.min(m0 + bm, seq) - 1, lower, upper, keys, bn)

            T.copy(Q[b, h, m0:m0 + bm, :], q_s)
            T.fill(acc_o, 0)
            if has_sink:
                for i in T.Parallel(bm):
                    m_i[i] = Sink[h] * _LOG2E
                    l_i[i] = 1.0
            else:
                T.fill(m_i, -T.infinity(acc_t))
                T.fill(l_i, 0)

            for kb in T.Pipelined(lo, hi, num_stages=cfg.stages):
                n0 = kb * bn
                T.copy(K[b, kvh, n0:n0 + bn, :], k_s)
                # Blocks wholly inside the band and the keys skip the per-element mask.
                if _interior(m0, bm, n0, bn, lower, upper, keys):
                    T.clear(acc_s)
                else:
                    for i, j in T.Parallel(bm, bn):
                        rel = n0 + j - (m0 + i)
                        acc_s[i, j] = T.if_then_else((rel >= lower) & (rel <= upper) & (n0 + j < keys), 0,
                                                     -T.infinity(acc_t))
                T.gemm(q_s, k_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.copy(V[b, kvh, n0:n0 + bn, :], v_s)
                T.copy(m_i, m_prev)
                T.reduce_max(acc_s, m_i, dim=1, clear=True)
                for i in T.Parallel(bm):
                    m_i[i] = T.max(m_prev[i], m_i[i] * scale_log2)
                    # A row with nothing allowed so far keeps m = -inf: shift by 0 so that p = 0, not NaN.
                    m_use[i] = T.if_then_else(m_i[i] == -T.infinity(acc_t), 0, m_i[i])
                    alpha[i] = T.exp2(m_prev[i] - m_use[i])
                for i, j in T.Parallel(bm, dim_v):
                    acc_o[i, j] *= alpha[i]
                for i, j in T.Parallel(bm, bn):
                    acc_s[i, j] = T.exp2(acc_s[i, j] * scale_log2 - m_use[i])
                T.copy(acc_s, p)
                T.gemm(p, v_s, acc_o, policy=T.GemmWarpPolicy.FullRow)
                T.reduce_sum(acc_s, row_sum, dim=1)
                for i in T.Parallel(bm):
                    l_i[i] = l_i[i] * alpha[i] + row_sum[i]

            # l = 0 (nothing allowed, no sink): out = 0 / 0 = NaN and lse = -inf, as the reference.
            for i, j in T.Parallel(bm, dim_v):
                acc_o[i, j] = acc_o[i, j] / l_i[i]
            for i in T.Parallel(bm):
                lse[i] = (m_i[i] + T.log2(l_i[i])) * _LN2
            T.copy(acc_o, o_s)
            T.copy(o_s, Out[b, h, m0:m0 + bm, :])
            T.copy(lse, Lse[b, h, m0:m0 + bm])

    return tilelang.compile(fwd, target=TARGET)


@functools.lru_cache(maxsize=None)
def _prep_kernel(dim_v: int, dtype: str):
    """delta = rowsum(O * dO) (0 on empty rows) and lse2 = lse * log2(e) (+inf on empty rows), written
    into rows padded to ``SP`` (a multiple of 4, zero-filled by the caller): the dK/dV kernel loads
    them by TMA, whose row strides must be multiples of 16 bytes."""
    import tilelang
    import tilelang.language as T

    block = 64
    acc_t = "float32"
    heads, seq, seq_pad = T.dynamic("BH"), T.dynamic("S"), T.dynamic("SP")

    @T.prim_func
    def prep(O: T.Tensor((heads, seq, dim_v), dtype), dO: T.Tensor((heads, seq, dim_v), dtype),
             Lse: T.Tensor((heads, seq), acc_t), Delta: T.Tensor((heads, seq_pad), acc_t),
             Lse2: T.Tensor((heads, seq_pad), acc_t)):
        with T.Kernel(T.ceildiv(seq, block), heads, threads=128) as (bx, bh):
            o = T.alloc_fragment((block, dim_v), acc_t)
            do = T.alloc_fragment((block, dim_v), acc_t)
            delta = T.alloc_fragment((block,), acc_t)
            T.copy(O[bh, bx * block:(bx + 1) * block, :], o)
            T.copy(dO[bh, bx * block:(bx + 1) * block, :], do)
            for i, j in T.Parallel(block, dim_v):
                o[i, j] *= do[i, j]
            T.reduce_sum(o, delta, dim=1)
            for i in T.Parallel(block):
                r = bx * block + i
                if r < seq:
                    empty = Lse[bh, r] == -T.infinity(acc_t)
                    Delta[bh, r] = T.if_then_else(empty, 0, delta[i])
                    Lse2[bh, r] = T.if_then_else(empty, T.infinity(acc_t), Lse[bh, r] * _LOG2E)

    return tilelang.compile(prep, target=TARGET)


@functools.lru_cache(maxsize=None)
def _dkdv_kernel(dim: int, dim_v: int, dtype: str, cfg: BwdConfig = BwdConfig()):
    import tilelang
    import tilelang.language as T

    bm, bn = cfg.block_m, cfg.block_n
    acc_t = "float32"
    batch, hq, hkv, seq, keys, seq_pad = (T.dynamic(n) for n in ("B", "HQ", "HKV", "S", "T", "SP"))

    @T.prim_func
    def dkdv(Q: T.Tensor((batch, hq, seq, dim), dtype),
             K: T.Tensor((batch, hkv, keys, dim), dtype),
             V: T.Tensor((batch, hkv, keys, dim_v), dtype),
             dO: T.Tensor((batch, hq, seq, dim_v), dtype),
             Lse2: T.Tensor((batch, hq, seq_pad), acc_t),
             Delta: T.Tensor((batch, hq, seq_pad), acc_t),
             dK: T.Tensor((batch, hkv, keys, dim), dtype),
             dV: T.Tensor((batch, hkv, keys, dim_v), dtype),
             scale: T.float32, lower: T.int32, upper: T.int32):
        with T.Kernel(T.ceildiv(keys, bn), hkv, batch, threads=cfg.threads) as (bx, kvh, b):
            k_s = T.alloc_shared((bn, dim), dtype)
            v_s = T.alloc_shared((bn, dim_v), dtype)
            q_s = T.alloc_shared((bm, dim), dtype)
            do_s = T.alloc_shared((bm, dim_v), dtype)
            lse2_s = T.alloc_shared((bm,), acc_t)
            delta_s = T.alloc_shared((bm,), acc_t)
            dk_s = T.alloc_shared((bn, dim), dtype)
            dv_s = T.alloc_shared((bn, dim_v), dtype)
            s_t = T.alloc_fragment((bn, bm), acc_t)  # [keys, queries]
            dp_t = T.alloc_fragment((bn, bm), acc_t)
            p_t = T.alloc_fragment((bn, bm), dtype)
            ds_t = T.alloc_fragment((bn, bm), dtype)
            dk = T.alloc_fragment((bn, dim), acc_t)
            dv = T.alloc_fragment((bn, dim_v), acc_t)

            group = hq // hkv
            scale_log2 = scale * _LOG2E
            n0 = bx * bn
            # lower <= j - i <= upper  <=>  -upper <= i - j <= -lower: the band seen from the keys.
            lo, hi = _visited_blocks(T, n0, T.min(n0 + bn, keys) - 1, -upper, -lower, seq, bm)
            T.copy(K[b, kvh, n0:n0 + bn, :], k_s)
            T.copy(V[b, kvh, n0:n0 + bn, :], v_s)
            T.fill(dk, 0)
            T.fill(dv, 0)

            # One loop over (query head of the group, query block): the pipeline runs across heads.
            for it in T.Pipelined((hi - lo) * group, num_stages=cfg.stages):
                h = kvh * group + it // (hi - lo)
                m0 = (lo + it % (hi - lo)) * bm
                T.copy(Q[b, h, m0:m0 + bm, :], q_s)
                T.gemm(k_s, q_s, s_t, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                T.copy(Lse2[b, h, m0:m0 + bm], lse2_s)
                if _interior(m0, bm, n0, bn, lower, upper, keys) & (m0 + bm <= seq):
                    for j, i in T.Parallel(bn, bm):
                        s_t[j, i] = T.exp2(s_t[j, i] * scale_log2 - lse2_s[i])
                else:
                    for j, i in T.Parallel(bn, bm):
                        rel = n0 + j - (m0 + i)
                        # Rows past S read lse2 = 0 from the zero-filled load: the mask zeroes them.
                        s_t[j, i] = T.if_then_else((rel >= lower) & (rel <= upper) & (m0 + i < seq) & (n0 + j < keys),
                                                   T.exp2(s_t[j, i] * scale_log2 - lse2_s[i]), 0)
                T.copy(dO[b, h, m0:m0 + bm, :], do_s)
                T.gemm(v_s, do_s, dp_t, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                T.copy(s_t, p_t)
                T.gemm(p_t, do_s, dv, policy=T.GemmWarpPolicy.FullRow)
                T.copy(Delta[b, h, m0:m0 + bm], delta_s)
                for j, i in T.Parallel(bn, bm):  # dS of the scaled scores: dK needs no final scaling
                    ds_t[j, i] = s_t[j, i] * (dp_t[j, i] - delta_s[i]) * scale
                T.gemm(ds_t, q_s, dk, policy=T.GemmWarpPolicy.FullRow)

            T.copy(dk, dk_s)
            T.copy(dk_s, dK[b, kvh, n0:n0 + bn, :])
            T.copy(dv, dv_s)
            T.copy(dv_s, dV[b, kvh, n0:n0 + bn, :])

    return tilelang.compile(dkdv, target=TARGET)


@functools.lru_cache(maxsize=None)
def _dq_kernel(dim: int, dim_v: int, dtype: str, cfg: BwdConfig = BwdConfig()):
    import tilelang
    import tilelang.language as T

    bm, bn = cfg.block_n, cfg.block_m  # queries per CTA, keys per step
    acc_t = "float32"
    batch, hq, hkv, seq, keys, seq_pad = (T.dynamic(n) for n in ("B", "HQ", "HKV", "S", "T", "SP"))

    @T.prim_func
    def dq_fn(Q: T.Tensor((batch, hq, seq, dim), dtype),
              K: T.Tensor((batch, hkv, keys, dim), dtype),
              V: T.Tensor((batch, hkv, keys, dim_v), dtype),
              dO: T.Tensor((batch, hq, seq, dim_v), dtype),
              Lse2: T.Tensor((batch, hq, seq_pad), acc_t),
              Delta: T.Tensor((batch, hq, seq_pad), acc_t),
              dQ: T.Tensor((batch, hq, seq, dim), dtype),
              scale: T.float32, lower: T.int32, upper: T.int32):
        with T.Kernel(T.ceildiv(seq, bm), hq, batch, threads=cfg.threads) as (bx, h, b):
            q_s = T.alloc_shared((bm, dim), dtype)
            do_s = T.alloc_shared((bm, dim_v), dtype)
            k_s = T.alloc_shared((bn, dim), dtype)
            v_s = T.alloc_shared((bn, dim_v), dtype)
            dq_s = T.alloc_shared((bm, dim), dtype)
            lse2 = T.alloc_fragment((bm,), acc_t)
            delta = T.alloc_fragment((bm,), acc_t)
            s = T.alloc_fragment((bm, bn), acc_t)
            dp = T.alloc_fragment((bm, bn), acc_t)
            ds = T.alloc_fragment((bm, bn), dtype)
            dq = T.alloc_fragment((bm, dim), acc_t)

            kvh = h // (hq // hkv)
            scale_log2 = scale * _LOG2E
            m0 = (T.ceildiv(seq, bm) - 1 - bx) * bm
            lo, hi = _visited_blocks(T, m0, T.min(m0 + bm, seq) - 1, lower, upper, keys, bn)
            T.copy(Q[b, h, m0:m0 + bm, :], q_s)
            T.copy(dO[b, h, m0:m0 + bm, :], do_s)
            T.copy(Lse2[b, h, m0:m0 + bm], lse2)
            T.copy(Delta[b, h, m0:m0 + bm], delta)
            T.fill(dq, 0)

            for kb in T.Pipelined(lo, hi, num_stages=cfg.stages):
                n0 = kb * bn
                T.copy(K[b, kvh, n0:n0 + bn, :], k_s)
                T.gemm(q_s, k_s, s, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                if _interior(m0, bm, n0, bn, lower, upper, keys) & (m0 + bm <= seq):
                    for i, j in T.Parallel(bm, bn):
                        s[i, j] = T.exp2(s[i, j] * scale_log2 - lse2[i])
                else:
                    for i, j in T.Parallel(bm, bn):
                        rel = n0 + j - (m0 + i)
                        s[i, j] = T.if_then_else((rel >= lower) & (rel <= upper) & (n0 + j < keys) & (m0 + i < seq),
                                                 T.exp2(s[i, j] * scale_log2 - lse2[i]), 0)
                T.copy(V[b, kvh, n0:n0 + bn, :], v_s)
                T.gemm(do_s, v_s, dp, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                for i, j in T.Parallel(bm, bn):
                    ds[i, j] = s[i, j] * (dp[i, j] - delta[i]) * scale
                T.gemm(ds, k_s, dq, policy=T.GemmWarpPolicy.FullRow)

            T.copy(dq, dq_s)
            T.copy(dq_s, dQ[b, h, m0:m0 + bm, :])

    return tilelang.compile(dq_fn, target=TARGET)


def compile_for_sm90a(dim: int = 128, dim_v: int = 128, dtype: torch.dtype = torch.bfloat16,
                      has_sink: bool = True, fwd_config: FwdConfig = FwdConfig(),
                      bwd_config: BwdConfig = BwdConfig()) -> dict:
    """Build (or fetch from the in-process cache) the forward and backward kernels for sm_90a; nvcc
    runs, no GPU is needed. Returns the compiled kernels by name (``.get_kernel_source()`` gives
    the CUDA)."""
    name = _DTYPES[dtype]
    return {"fwd": _fwd_kernel(dim, dim_v, name, has_sink, fwd_config), "prep": _prep_kernel(dim_v, name),
            "dkdv": _dkdv_kernel(dim, dim_v, name, bwd_config), "dq": _dq_kernel(dim, dim_v, name, bwd_config)}


def tilelang_unsupported_reason(q, k, v, *, scale=None, sink=None, bias=None, lower=None, upper=None,
                                topk=None) -> Optional[str]:
    """None when the TileLang kernels can serve the call, else a one-line reason."""
    if bias is not None:
        return "additive bias is not supported by the tilelang attention kernel"
    if topk is not None:
        return "topk index masks are not supported by the tilelang attention kernel"
    if q.dtype not in _DTYPES:
        return f"dtype {str(q.dtype).removeprefix('torch.')} (the tilelang kernel takes float16, bfloat16)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    dims = (q.shape[-1], v.shape[-1])
    if dims not in HEAD_DIMS:
        return f"head dims (D, Dv) = {dims} (the tilelang kernel is built for {', '.join(map(str, HEAD_DIMS))})"
    if scale is not None and not scale > 0:
        return f"scale {scale} (the kernel's running max needs scale > 0)"
    reason = tilelang_device_reason((q, k, v, sink), "tilelang attention kernel")
    if reason is not None:
        return reason
    if q.shape[0] > _MAX_GRID_YZ or q.shape[1] > _MAX_GRID_YZ:
        return f"B={q.shape[0]}, Hq={q.shape[1]}: the grid's y/z dimensions stop at {_MAX_GRID_YZ}"
    if max(t.numel() for t in (q, k, v)) >= 2 ** 31:
        return "a tensor has 2**31 or more elements (the kernels index in int32)"
    return None


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned base: TMA descriptors need both."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _prepare(q, k, v, scale, sink, bias, lower, upper, topk):
    check_attention_args(q, k, v, sink=sink, bias=bias, topk=topk)
    reason = tilelang_unsupported_reason(q, k, v, scale=scale, sink=sink, bias=bias, lower=lower, upper=upper,
                                         topk=topk)
    if reason is not None:
        raise ValueError(f"attention_tilelang cannot serve this call: {reason}")
    return (_aligned(q), _aligned(k), _aligned(v)), clamp_band(lower, upper, q.shape[2], k.shape[2])


def attention_tilelang(q, k, v, *, scale: float, sink=None, bias=None, lower=None, upper=None, topk=None,
                       config: Optional[FwdConfig] = None):
    """Returns (out [B, Hq, S, Dv] in q.dtype, lse [B, Hq, S] fp32). ``config``: the tiles (default:
    ``CONFIGS`` by head dim and band)."""
    (q, k, v), band = _prepare(q, k, v, scale, sink, bias, lower, upper, topk)
    batch, hq, seq, dim = q.shape
    out = q.new_empty(batch, hq, seq, v.shape[3])
    lse = torch.empty(batch, hq, seq, dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return out, lse
    if k.shape[2] == 0:  # nothing to attend to: the softmax of the sink column alone, or of nothing
        out.fill_(0.0 if sink is not None else math.nan)
        lse.copy_((sink.float() if sink is not None else torch.full_like(lse[0, :, 0], -math.inf))[None, :, None]
                  .expand_as(lse))
        return out, lse
    sink_arg = (sink if sink is not None else q.new_zeros(hq)).float().contiguous()
    config = config or default_configs(dim, *band)[0]
    _fwd_kernel(dim, v.shape[3], _DTYPES[q.dtype], sink is not None, config)(q, k, v, sink_arg, out, lse,
                                                                              scale * _LOG2E, *band)
    return out, lse


def attention_tilelang_backward(q, k, v, out, lse, dout, *, scale: float, sink=None, bias=None, lower=None,
                                upper=None, topk=None, config: Optional[BwdConfig] = None):
    """Returns (dq, dk, dv, dsink); dsink is None without a sink. ``config``: the tiles (default:
    ``CONFIGS`` by head dim and band)."""
    (q, k, v), band = _prepare(q, k, v, scale, sink, bias, lower, upper, topk)
    batch, hq, seq, dim = q.shape
    dim_v = v.shape[3]
    if out.shape != (batch, hq, seq, dim_v) or dout.shape != out.shape or lse.shape != (batch, hq, seq):
        raise ValueError(f"out {tuple(out.shape)}, dout {tuple(dout.shape)}, lse {tuple(lse.shape)}: expected "
                         f"out/dout {(batch, hq, seq, dim_v)} and lse {(batch, hq, seq)}")
    name = _DTYPES[q.dtype]
    dq = torch.zeros_like(q) if seq == 0 or k.shape[2] == 0 else torch.empty_like(q)
    dk = torch.zeros_like(k) if seq == 0 or k.shape[2] == 0 else torch.empty_like(k)
    dv = torch.zeros_like(v) if seq == 0 or k.shape[2] == 0 else torch.empty_like(v)
    # Rows padded to a multiple of 4 (see _prep_kernel); the padding stays 0 (p and ds vanish there).
    delta_pad = torch.zeros(batch, hq, -(-seq // 4) * 4, dtype=torch.float32, device=q.device)
    delta = delta_pad[..., :seq]
    if delta.numel():
        out, dout = _aligned(out.to(q.dtype)), _aligned(dout.to(q.dtype))
        lse2 = torch.zeros_like(delta_pad)
        _prep_kernel(dim_v, name)(out.view(-1, seq, dim_v), dout.view(-1, seq, dim_v),
                                  lse.float().contiguous().view(-1, seq), delta_pad.view(batch * hq, -1),
                                  lse2.view(batch * hq, -1))
        if k.shape[2]:
            config = config or default_configs(dim, *band)[1]
            _dkdv_kernel(dim, dim_v, name, config)(q, k, v, dout, lse2, delta_pad, dk, dv, scale, *band)
            _dq_kernel(dim, dim_v, name, config)(q, k, v, dout, lse2, delta_pad, dq, scale, *band)
    dsink = None
    if sink is not None:  # d lse / d sink = p_sink = exp(sink - lse); dsink = -sum(p_sink * delta)
        dsink = -(torch.exp(sink.float()[None, :, None] - lse.float()) * delta).sum((0, 2)).to(sink.dtype)
    return dq, dk, dv, dsink
