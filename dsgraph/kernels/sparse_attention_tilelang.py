"""TileLang (Hopper, sm_90a) sparse MLA attention, latent/MQA layout (DeepSeek V3.2 and V4).

Semantics: ``dsgraph/ops/sparse_attention.py``; oracle: ``dsgraph/kernels/sparse_attention_ref.py``.
q [B, S, H, D], kv [B, T, 1, D] (one latent key per position shared by all heads; values are its
first ``d_v`` = 512 dims), indices [B, S, 1, K], with D = 576 (512 latent + 64 rope: V3.2) or D = 512
(K = V: V4). Index ``i`` of query row ``s`` counts when 0 <= i <= min(s + upper, T - 1) (``upper``
None: i < T); the others (-1, >= T, causally invalid, and the slots past K in the last key block) are
skipped. An optional per-head sink logit is one more softmax column that adds no value: folded into
the forward's epilogue (lse' = logaddexp(lse, sink), out scaled by exp(lse - lse')). A row without a
valid key gives out = 0, lse = sink (-inf without one) and zero gradients. lse is the natural log of
the scaled scores and the sink; the backward needs no sink term (p = exp(s - lse')).

Forward (FlashMLA's sparse prefill schedule; one CTA = one query row x 64 heads, 3 warpgroups):
- WG2, the producer, gathers the row's selected keys, 64 per block, into two shared buffers with
  cp.async (zero-filled for invalid slots, so stale or uninitialised shared memory never reaches
  the tensor cores), publishes a validity flag per slot, and signals the buffer's mbarrier;
- WG0 loads q, computes S = Q K^T over all 576 dims (wgmma), the online softmax (exp2, fp32), and
  O[:, :256] += P V; it leaves P (bf16) and the rescale factors in shared memory;
- WG1 computes O[:, 256:] += P V from them, overlapping WG0's next Q K^T.
Heads are served in blocks of 64 (a wgmma's M per warpgroup): H not a multiple of 64 is padded with
zero queries by the wrapper (the padded rows cost compute, never correctness).

Backward (one CTA = one query row x 64 heads, 2 warpgroups, after TileLang's example): recompute P
from lse, dP = dO V^T, dS = P (dP - delta) * scale, dQ += dS K (registers, over all K), and the key
block's dKV = dS^T Q + P^T dO added to an fp32 dKV with 16-byte atomics. delta = rowsum(O * dO)
comes from a small kernel.

Compiled kernels: one forward, one backward and one delta kernel per process (cached; also on
disk by TileLang): batch, lengths, head blocks and K are dynamic, so one build serves every shape.
``tilelang`` is imported lazily: importing this module never fails.
"""
# No `from __future__ import annotations`: TileLang evaluates the prim_funcs' annotations, which
# name the builders' local dynamic shapes.
import functools
import math
from typing import Optional

import torch

from .common import tilelang_device_reason

TARGET = {"kind": "cuda", "arch": "sm_90a"}
D_QK, D_V = 576, 512  # DeepSeek V3 MLA: 512 latent + 64 rope
DIMS = ((D_QK, D_V), (D_V, D_V))  # (d_qk, d_v) the kernels are built for; V4: K = V, no rope tail
PIECE = 64  # the width of the 16-byte cp.async pieces q and kv are moved in; the rope tail's width
BLOCK_H = 64  # heads per CTA: one wgmma M per warpgroup
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_PASS_CONFIGS = {"tl.enable_async_copy": True}


def _valid(T, Indices, b, s, slot, topk, max_key):
    """Whether key slot ``slot`` of query row ``s`` holds a usable index (``max_key`` =
    min(s + upper, T - 1); see the module docstring)."""
    key = Indices[b, s, 0, T.min(slot, topk - 1)]
    return (slot < topk) & (key >= 0) & (key <= max_key)


@functools.lru_cache(maxsize=None)
def _fwd_kernel(d_qk: int = D_QK, d_v: int = D_V):
    import tilelang
    import tilelang.language as T

    dtype, acc_t = "bfloat16", "float32"
    bh, bi = BLOCK_H, 64  # heads, keys per block
    half, tail = d_v // 2, d_qk - d_v
    has_tail = tail > 0
    tail_alloc = max(tail, 1)  # no zero-size buffers; unused without a tail
    batch, seq, keys, blocks, topk = (T.dynamic(n) for n in ("B", "S", "T", "HB", "K"))

    # q, out, lse and the sink are viewed with the heads split into HB blocks of 64.
    @T.prim_func
    def fwd(Q: T.Tensor((batch, seq, blocks, bh, d_qk), dtype),
            KV: T.Tensor((batch, keys, 1, d_qk), dtype),
            Indices: T.Tensor((batch, seq, 1, topk), "int32"),
            Sink: T.Tensor((blocks, bh), acc_t),
            Out: T.Tensor((batch, seq, blocks, bh, d_v), dtype),
            Lse: T.Tensor((batch, seq, blocks, bh), acc_t),
            scale_log2: T.float32,
            upper: T.int32):
        # rows and head blocks share grid x (y and z stop at 65535 blocks), head blocks fastest: the
        # blocks of one row gather the same keys back to back
        with T.Kernel(seq * blocks, batch, threads=384) as (row_hb, b):
            s, hb = row_hb // blocks, row_hb % blocks
            q_l = T.alloc_shared((bh, half), dtype)
            q_r = T.alloc_shared((bh, half), dtype)
            q_t = T.alloc_shared((bh, tail_alloc), dtype)
            kv_l = [T.alloc_shared((bi, half), dtype) for _ in range(2)]
            kv_r = [T.alloc_shared((bi, half), dtype) for _ in range(2)]
            kv_t = [T.alloc_shared((bi, tail_alloc), dtype) for _ in range(2)]
            valid = [T.alloc_shared((bi,), "bool") for _ in range(2)]
            p_s = T.alloc_shared((bh, bi), dtype)
            alpha_s = T.alloc_shared((bh,), acc_t)
            inv_sum_s = T.alloc_shared((bh,), acc_t)

            # Fragments are per warpgroup: one used in two branches would get one branch's layout.
            acc_o = T.alloc_fragment((bh, half), acc_t)  # WG0: O[:, :256]
            acc_o_r = T.alloc_fragment((bh, half), acc_t)  # WG1: O[:, 256:]
            acc_s = T.alloc_fragment((bh, bi), acc_t)
            m_i = T.alloc_fragment((bh,), acc_t)
            m_prev = T.alloc_fragment((bh,), acc_t)
            alpha = T.alloc_fragment((bh,), acc_t)
            sum_i = T.alloc_fragment((bh,), acc_t)
            sumexp = T.alloc_fragment((bh,), acc_t)
            lse = T.alloc_fragment((bh,), acc_t)

            kv_ready = T.alloc_barrier([128, 128])  # the producer's 128 threads
            kv_free = T.alloc_barrier([256, 256])  # both consumers are done with the buffer
            p_ready = T.alloc_barrier(256)  # WG0 published P and alpha; WG1 arrives too
            p_free = T.alloc_barrier(256)  # WG1 is done reading P; WG0 arrives too
            done = T.alloc_barrier(128)  # WG0 published 1 / sumexp

            max_key = T.min(s + upper, keys - 1)
            n_pairs = T.ceildiv(T.ceildiv(topk, bi), 2)
            tx = T.get_thread_binding()

            if tx < 128:
                T.set_max_nreg(240, 1)
                T.fill(acc_o, 0)
                T.fill(sumexp, 0)
                T.fill(m_i, -(2.0 ** 30))  # finite: a block without valid keys gives alpha = 1, not NaN
                # q in 16-byte cp.async pieces, while the producer gathers the first key block.
                for h, d in T.Parallel(bh, PIECE, prefer_async=True):
                    for u in tuple(range(0, half, PIECE)):
                        q_l[h, u + d] = Q[b, s, hb, h, u + d]
                        q_r[h, u + d] = Q[b, s, hb, h, half + u + d]
                    if has_tail:
                        q_t[h, d] = Q[b, s, hb, h, d_v + d]
                T.fence_proxy_async()
                for i in T.serial(n_pairs):
                    for buf in (0, 1):
                        T.barrier_wait(kv_ready[buf], i & 1)
                        for h, j in T.Parallel(bh, bi):
                            acc_s[h, j] = T.if_then_else(valid[buf][j], 0, -T.infinity(acc_t))
                        T.wgmma_gemm(q_l, kv_l[buf], acc_s, transpose_B=True)
                        T.wgmma_gemm(q_r, kv_r[buf], acc_s, transpose_B=True)
                        if has_tail:
                            T.wgmma_gemm(q_t, kv_t[buf], acc_s, transpose_B=True)
                        T.wait_wgmma(0)
                        # p_s / alpha_s of the previous block must have been read by WG1.
                        if buf == 1:
                            T.barrier_arrive(p_free)
                            T.barrier_wait(p_free, 0)
                        else:
                            if i > 0:
                                T.barrier_arrive(p_free)
                                T.barrier_wait(p_free, 1)
                        T.copy(m_i, m_prev)
                        T.reduce_max(acc_s, m_i, dim=1, clear=False)
                        for h in T.Parallel(bh):
                            alpha[h] = T.exp2((m_prev[h] - m_i[h]) * scale_log2)
                        for h, j in T.Parallel(bh, bi):
                            acc_s[h, j] = T.exp2(acc_s[h, j] * scale_log2 - m_i[h] * scale_log2)
                        T.reduce_sum(acc_s, sum_i, dim=1)
                        for h in T.Parallel(bh):
                            sumexp[h] = sumexp[h] * alpha[h] + sum_i[h]
                        for h, d in T.Parallel(bh, half):
                            acc_o[h, d] *= alpha[h]
                        T.copy(alpha, alpha_s)
                        T.copy(acc_s, p_s)
                        T.gemm(p_s, kv_l[buf], acc_o)
                        T.barrier_arrive(p_ready)
                        T.barrier_arrive(kv_free[buf])
                # The sink column joins the normaliser: lse' = log2(2^lse + 2^sink) (log2 units), out
                # = acc * 2^(m - lse'). A row without valid keys has sumexp = 0: out = 0, lse = sink.
                for h in T.Parallel(bh):
                    lse[h] = T.if_then_else(sumexp[h] > 0, T.log2(sumexp[h]) + m_i[h] * scale_log2,
                                            -T.infinity(acc_t))
                    sink2 = Sink[hb, h] * _LOG2E
                    top = T.max(lse[h], sink2)
                    hi = T.if_then_else(top == -T.infinity(acc_t), 0.0, top)
                    lse[h] = hi + T.log2(T.exp2(lse[h] - hi) + T.exp2(sink2 - hi))
                    alpha[h] = T.if_then_else(sumexp[h] > 0, T.exp2(m_i[h] * scale_log2 - lse[h]), 0.0)
                    lse[h] = lse[h] * _LN2
                T.copy(alpha, inv_sum_s)
                T.barrier_arrive(done)
                for h, d in T.Parallel(bh, half):
                    acc_o[h, d] *= alpha[h]
                T.copy(acc_o, Out[b, s, hb, :, 0:half])
                T.copy(lse, Lse[b, s, hb, :])
            elif tx < 256:
                T.set_max_nreg(168, 1)
                T.fill(acc_o_r, 0)
                for i in T.serial(n_pairs):
                    for buf in (0, 1):
                        T.barrier_arrive(p_ready)
                        T.barrier_wait(p_ready, buf)
                        for h, d in T.Parallel(bh, half):
                            acc_o_r[h, d] *= alpha_s[h]
                        T.gemm(p_s, kv_r[buf], acc_o_r)
                        T.barrier_arrive(kv_free[buf])
                        if buf == 0:
                            T.barrier_arrive(p_free)
                        else:
                            if i < n_pairs - 1:  # WG0 waits for this block only before another one
                                T.barrier_arrive(p_free)
                T.barrier_wait(done, 0)
                for h, d in T.Parallel(bh, half):
                    acc_o_r[h, d] *= inv_sum_s[h]
                T.copy(acc_o_r, Out[b, s, hb, :, half:d_v])
            else:
                T.set_max_nreg(80, 0)
                for i in T.serial(n_pairs):
                    for buf in (0, 1):
                        T.barrier_wait(kv_free[buf], (i & 1) ^ 1)
                        for j in T.Parallel(bi):
                            valid[buf][j] = _valid(T, Indices, b, s, (2 * i + buf) * bi + j, topk, max_key)
                        # One parallel loop, so the producer commits and waits once per block: 8
                        # threads per key row, each moving 16-byte pieces (cp.async, zero-filled for
                        # invalid slots). Validity is recomputed from global indices here: reading the
                        # flags from shared memory would make every store wait on a barrier.
                        for j, d in T.Parallel(bi, PIECE, prefer_async=True):
                            slot = (2 * i + buf) * bi + j
                            ok = _valid(T, Indices, b, s, slot, topk, max_key)
                            key = Indices[b, s, 0, T.min(slot, topk - 1)]
                            for u in tuple(range(0, half, PIECE)):  # unrolled at trace time
                                kv_l[buf][j, u + d] = T.if_then_else(ok, KV[b, key, 0, u + d], 0)
                                kv_r[buf][j, u + d] = T.if_then_else(ok, KV[b, key, 0, half + u + d], 0)
                            if has_tail:
                                kv_t[buf][j, d] = T.if_then_else(ok, KV[b, key, 0, d_v + d], 0)
                        # The loop above waits for its copies; the release-arrive publishes them and
                        # the flags, the proxy fence makes them visible to the consumers' wgmma.
                        T.fence_proxy_async()
                        T.barrier_arrive(kv_ready[buf])

    return tilelang.compile(fwd, target=TARGET, pass_configs=_PASS_CONFIGS)


@functools.lru_cache(maxsize=None)
def _delta_kernel(d_v: int = D_V):
    """delta[n] = sum_d out[n, d] * dout[n, d] in fp32, one row per (b, s, h)."""
    import tilelang
    import tilelang.language as T

    block_n, block_d = 64, 64
    n = T.dynamic("N")

    @T.prim_func
    def delta(O: T.Tensor((n, d_v), "bfloat16"), dO: T.Tensor((n, d_v), "bfloat16"),
              Delta: T.Tensor((n,), "float32")):
        with T.Kernel(T.ceildiv(n, block_n), threads=128) as bx:
            o = T.alloc_fragment((block_n, block_d), "float32")
            do = T.alloc_fragment((block_n, block_d), "float32")
            acc = T.alloc_fragment((block_n, block_d), "float32")
            row = T.alloc_fragment((block_n,), "float32")
            T.clear(acc)
            for k in T.Pipelined(d_v // block_d, num_stages=2):
                T.copy(O[bx * block_n, k * block_d], o)
                T.copy(dO[bx * block_n, k * block_d], do)
                for i, j in T.Parallel(block_n, block_d):
                    acc[i, j] += o[i, j] * do[i, j]
            T.reduce_sum(acc, row, dim=1)
            T.copy(row, Delta[bx * block_n])

    return tilelang.compile(delta, target=TARGET)


@functools.lru_cache(maxsize=None)
def _bwd_kernel(d_qk: int = D_QK, d_v: int = D_V):
    import tilelang
    import tilelang.language as T

    dtype, acc_t = "bfloat16", "float32"
    bh, bs = BLOCK_H, 32  # heads, keys per block
    tail = d_qk - d_v
    has_tail = tail > 0
    tail_alloc = max(tail, 4)  # no zero-size buffers; unused without a tail
    part = bs // 2  # dKV rows staged in shared memory per atomic round (two rounds per block)
    batch, seq, keys, blocks, topk = (T.dynamic(n) for n in ("B", "S", "T", "HB", "K"))
    col = T.GemmWarpPolicy.FullCol

    @T.prim_func
    def bwd(Q: T.Tensor((batch, seq, blocks, bh, d_qk), dtype),
            KV: T.Tensor((batch, keys, 1, d_qk), dtype),
            dO: T.Tensor((batch, seq, blocks, bh, d_v), dtype),
            Indices: T.Tensor((batch, seq, 1, topk), "int32"),
            Lse: T.Tensor((batch, seq, blocks, bh), acc_t),
            Delta: T.Tensor((batch, seq, blocks, bh), acc_t),
            dQ: T.Tensor((batch, seq, blocks, bh, d_qk), dtype),
            dKV: T.Tensor((batch, keys, 1, d_qk), acc_t),
            scale: T.float32,
            upper: T.int32):
        # rows and head blocks share grid x (y and z stop at 65535 blocks), head blocks fastest: the
        # blocks of one row gather the same keys back to back
        with T.Kernel(seq * blocks, batch, threads=256) as (row_hb, b):
            s, hb = row_hb // blocks, row_hb % blocks
            q_s = T.alloc_shared((bh, d_v), dtype)
            q_t = T.alloc_shared((bh, tail_alloc), dtype)
            do_s = T.alloc_shared((bh, d_v), dtype)
            kv_s = T.alloc_shared((bs, d_v), dtype)
            kv_t = T.alloc_shared((bs, tail_alloc), dtype)
            p_s = T.alloc_shared((bh, bs), dtype)
            ds_s = T.alloc_shared((bh, bs), dtype)
            dkv_s = T.alloc_shared((part, d_v), acc_t)
            dkv_t_s = T.alloc_shared((part, tail_alloc), acc_t)
            valid = T.alloc_shared((bs,), "bool")
            lse2 = T.alloc_shared((bh,), acc_t)
            delta = T.alloc_shared((bh,), acc_t)

            acc_p = T.alloc_fragment((bh, bs), acc_t)
            acc_dp = T.alloc_fragment((bh, bs), acc_t)
            acc_dq = T.alloc_fragment((bh, d_v), acc_t)
            acc_dq_t = T.alloc_fragment((bh, tail_alloc), acc_t)
            acc_dkv = T.alloc_fragment((bs, d_v), acc_t)
            acc_dkv_t = T.alloc_fragment((bs, tail_alloc), acc_t)

            max_key = T.min(s + upper, keys - 1)
            scale_log2 = scale * _LOG2E
            T.copy(Q[b, s, hb, :, 0:d_v], q_s)
            if has_tail:
                T.copy(Q[b, s, hb, :, d_v:d_qk], q_t)
            T.copy(dO[b, s, hb, :, :], do_s)
            for h in T.Parallel(bh):
                lse2[h] = Lse[b, s, hb, h] * _LOG2E
                delta[h] = Delta[b, s, hb, h]
            T.clear(acc_dq)
            if has_tail:
                T.clear(acc_dq_t)

            for i in T.Pipelined(T.ceildiv(topk, bs), num_stages=0):
                for j in T.Parallel(bs):
                    valid[j] = _valid(T, Indices, b, s, i * bs + j, topk, max_key)
                # Invalid slots load zeros; their P is set to 0 below, so they add nothing.
                for j, d in T.Parallel(bs, d_v):
                    kv_s[j, d] = T.if_then_else(
                        valid[j], KV[b, Indices[b, s, 0, T.min(i * bs + j, topk - 1)], 0, d], 0)
                if has_tail:
                    for j, d in T.Parallel(bs, tail):
                        kv_t[j, d] = T.if_then_else(
                            valid[j], KV[b, Indices[b, s, 0, T.min(i * bs + j, topk - 1)], 0, d_v + d], 0)
                T.gemm(q_s, kv_s, acc_p, transpose_B=True, clear_accum=True, policy=col)
                if has_tail:
                    T.gemm(q_t, kv_t, acc_p, transpose_B=True, policy=col)
                for h, j in T.Parallel(bh, bs):
                    acc_p[h, j] = T.if_then_else(valid[j], T.exp2(acc_p[h, j] * scale_log2 - lse2[h]), 0)
                T.copy(acc_p, p_s)
                T.gemm(do_s, kv_s, acc_dp, transpose_B=True, clear_accum=True, policy=col)
                for h, j in T.Parallel(bh, bs):
                    acc_dp[h, j] = acc_p[h, j] * (acc_dp[h, j] - delta[h]) * scale
                T.copy(acc_dp, ds_s)
                T.gemm(ds_s, kv_s, acc_dq, policy=col)
                if has_tail:
                    T.gemm(ds_s, kv_t, acc_dq_t, policy=col)
                T.gemm(ds_s, q_s, acc_dkv, transpose_A=True, clear_accum=True, policy=col)
                T.gemm(p_s, do_s, acc_dkv, transpose_A=True, policy=col)
                if has_tail:
                    T.gemm(ds_s, q_t, acc_dkv_t, transpose_A=True, clear_accum=True, policy=col)
                for r in (0, 1):  # half the block's rows at a time keeps the fp32 staging at 36 KB
                    for j, d in T.Parallel(bs, d_v):
                        if j // part == r:
                            dkv_s[j % part, d] = acc_dkv[j, d]
                    if has_tail:
                        for j, d in T.Parallel(bs, tail):
                            if j // part == r:
                                dkv_t_s[j % part, d] = acc_dkv_t[j, d]
                    for j, d in T.Parallel(part, d_v // 4):
                        if valid[r * part + j]:
                            T.atomic_addx4(
                                dKV[b, Indices[b, s, 0, i * bs + r * part + j], 0, d * 4], dkv_s[j, d * 4])
                    if has_tail:
                        for j, d in T.Parallel(part, tail // 4):
                            if valid[r * part + j]:
                                T.atomic_addx4(dKV[b, Indices[b, s, 0, i * bs + r * part + j], 0, d_v + d * 4],
                                               dkv_t_s[j, d * 4])

            T.copy(acc_dq, dQ[b, s, hb, :, 0:d_v])
            if has_tail:
                T.copy(acc_dq_t, dQ[b, s, hb, :, d_v:d_qk])

    return tilelang.compile(bwd, target=TARGET, pass_configs=_PASS_CONFIGS)


def compile_for_sm90a(d_qk: int = D_QK, d_v: int = D_V) -> dict:
    """Build (or fetch from the in-process cache) the forward, backward and delta kernels of one of
    ``DIMS`` for sm_90a; nvcc runs, no GPU is needed. Returns the compiled kernels by name
    (``.get_kernel_source()`` gives the CUDA)."""
    return {"fwd": _fwd_kernel(d_qk, d_v), "bwd": _bwd_kernel(d_qk, d_v), "delta": _delta_kernel(d_v)}


# ``upper`` default of the wrappers: the causal band upper = T - S (DeepSeek V3.2's layout).
CAUSAL = "causal"


def _upper(q, kv, upper) -> Optional[int]:
    return kv.shape[1] - q.shape[1] if upper == CAUSAL else upper


def tilelang_unsupported_reason(q, kv, indices, *, scale, d_v, upper=CAUSAL, sink=None) -> Optional[str]:
    """None when the TileLang kernels can serve the call, else a one-line reason."""
    reason = tilelang_device_reason((q, kv, indices, sink), "tilelang sparse MLA kernels")
    if reason is not None:
        return reason
    if q.dtype != torch.bfloat16 or kv.dtype != torch.bfloat16:
        return f"dtypes q {q.dtype}, kv {kv.dtype} (the tilelang kernels take bfloat16)"
    if q.dim() != 4 or kv.dim() != 4 or indices.dim() != 4:
        return "layout not q [B, S, H, D], kv [B, T, 1, D], indices [B, S, 1, K]"
    if kv.shape[2] != 1 or indices.shape[2] != 1:
        return (f"{kv.shape[2]} kv heads / {indices.shape[2]} index groups (the kernels serve one latent key "
                "per position)")
    if q.shape[-1] != kv.shape[-1] or (q.shape[-1], d_v) not in DIMS:
        return (f"dims q {q.shape[-1]}, kv {kv.shape[-1]}, d_v {d_v} (built for (d_qk, d_v) in "
                f"{', '.join(map(str, DIMS))})")
    if indices.dtype not in (torch.int32, torch.int64):
        return f"indices dtype {indices.dtype} (int32 or int64)"
    if not scale > 0:
        return f"scale {scale} (the kernels' online softmax needs scale > 0)"
    if kv.shape[1] >= 2 ** 30:
        return "sequence too long for int32 key positions"
    upper = _upper(q, kv, upper)
    if upper is not None and not -2 ** 30 < upper < 2 ** 30:
        return f"upper {upper} (the kernels take an int32 causal offset, |upper| < 2^30)"
    if q.shape[0] > 65535:
        return f"B={q.shape[0]}: the grid's y dimension (batch) stops at 65535"
    if q.shape[1] * (q.shape[2] // BLOCK_H + (q.shape[2] % BLOCK_H > 0)) >= 2 ** 31:
        return f"S={q.shape[1]} x {q.shape[2]} heads: the grid's x dimension (rows x head blocks) stops at 2^31 - 1"
    return None


def _check_args(q, kv, indices, d_v, sink=None):
    batch, seq = q.shape[:2]
    if sink is not None and (not sink.dtype.is_floating_point or tuple(sink.shape) != (q.shape[2],)):
        raise ValueError(f"sink must be a floating-point tensor [H={q.shape[2]}]; got {sink.dtype} "
                         f"{tuple(sink.shape)}")
    if kv.shape[0] != batch or indices.shape[:2] != (batch, seq):
        raise ValueError(f"q {tuple(q.shape)}, kv {tuple(kv.shape)}, indices {tuple(indices.shape)}: "
                         "batch and query length must agree (q [B, S, H, D], kv [B, T, 1, D], indices [B, S, 1, K])")
    if not 0 < d_v <= q.shape[-1]:
        raise ValueError(f"d_v must be in [1, {q.shape[-1]}], got {d_v}")


def _prepare(q, kv, indices, scale, d_v, upper, sink=None):
    _check_args(q, kv, indices, d_v, sink)
    reason = tilelang_unsupported_reason(q, kv, indices, scale=scale, d_v=d_v, upper=upper, sink=sink)
    if reason is not None:
        raise ValueError(f"the tilelang sparse MLA kernels cannot serve this call: {reason}")
    # int64 positions past T mean "skip" as -1 does; clamping first keeps them so in int32.
    indices = indices.clamp(-1, kv.shape[1]).to(torch.int32) if indices.dtype == torch.int64 else indices
    return _aligned(kv), _aligned(indices)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned base: the kernels move 16-byte pieces with cp.async."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _head_blocks(t: torch.Tensor, heads: int, value: float = 0.0) -> torch.Tensor:
    """[B, S, H, ...] -> [B, S, HB, 64, ...] with H padded by ``value`` to a multiple of 64."""
    pad = heads - t.shape[2]
    if pad:
        t = torch.cat([t, t.new_full((*t.shape[:2], pad, *t.shape[3:]), value)], dim=2)
    t = _aligned(t)
    return t.view(*t.shape[:2], heads // BLOCK_H, BLOCK_H, *t.shape[3:])


def _kernel_upper(q, kv, upper) -> int:
    """The kernels' int32 ``upper``: without a bound, T - 1 (every row may reach key T - 1)."""
    upper = _upper(q, kv, upper)
    return kv.shape[1] - 1 if upper is None else upper


def sparse_mla_fwd_tilelang(q, kv, indices, *, scale: float, d_v: int = D_V, upper=CAUSAL, sink=None):
    """(out [B, S, H, d_v] bf16, lse [B, S, H] fp32): see the module docstring. ``upper``: entry j of
    row s counts iff j - s <= upper (None: no bound; default T - S, the causal band); ``sink``: per-head
    logits [H] (any float dtype, used in fp32) or None."""
    kv, indices = _prepare(q, kv, indices, scale, d_v, upper, sink)
    batch, seq, heads, _ = q.shape
    padded = -(-heads // BLOCK_H) * BLOCK_H
    launch = batch * seq * heads > 0 and indices.shape[-1] > 0 and kv.shape[1] > 0
    out = q.new_empty(batch, seq, padded, d_v)
    lse = torch.empty(batch, seq, padded, dtype=torch.float32, device=q.device)
    if not launch:  # no valid key anywhere
        out.zero_()
        lse.fill_(-math.inf)
        if sink is not None:
            lse[:, :, :heads] = sink.float()
    else:
        # A sink of -inf is no sink: logaddexp(lse, -inf) = lse.
        sinks = torch.full((heads,), -math.inf, device=q.device) if sink is None else sink.float()
        _fwd_kernel(q.shape[-1], d_v)(_head_blocks(q, padded), kv, indices,
                                      _head_blocks(sinks[None, None], padded, -math.inf)[0, 0],
                                      out.view(batch, seq, -1, BLOCK_H, d_v), lse.view(batch, seq, -1, BLOCK_H),
                                      scale * _LOG2E, _kernel_upper(q, kv, upper))
    if padded != heads:
        out, lse = out[:, :, :heads].contiguous(), lse[:, :, :heads].contiguous()
    return out, lse


def sparse_mla_bwd_tilelang(q, kv, out, dout, indices, lse, *, scale: float, d_v: int = D_V, upper=CAUSAL):
    """(dq [B, S, H, D] bf16, dkv [B, T, 1, D] fp32): dkv is accumulated with fp32 atomics (its order,
    hence its last bits, varies from run to run); the caller casts it. ``lse`` is the forward's (the
    sink included), ``upper`` as in the forward."""
    kv, indices = _prepare(q, kv, indices, scale, d_v, upper)
    batch, seq, heads, d_qk = q.shape
    if out.shape != (batch, seq, heads, d_v) or dout.shape != out.shape or lse.shape != (batch, seq, heads):
        raise ValueError(f"out {tuple(out.shape)}, dout {tuple(dout.shape)}, lse {tuple(lse.shape)}: expected "
                         f"out/dout {(batch, seq, heads, d_v)} and lse {(batch, seq, heads)}")
    padded = -(-heads // BLOCK_H) * BLOCK_H
    launch = batch * seq * heads > 0 and indices.shape[-1] > 0 and kv.shape[1] > 0
    dq = (q.new_empty if launch else q.new_zeros)(batch, seq, padded, d_qk)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
    if launch:
        out, dout = _aligned(out.to(q.dtype)), _aligned(dout.to(q.dtype))
        delta = torch.empty(batch, seq, heads, dtype=torch.float32, device=q.device)
        _delta_kernel()(out.view(-1, d_v), dout.view(-1, d_v), delta.view(-1))
        # Padded heads: q = dout = 0 and lse = +inf make P = dS = 0, so they add nothing to dkv.
        _bwd_kernel(d_qk, d_v)(_head_blocks(q, padded), kv, _head_blocks(dout, padded), indices,
                               _head_blocks(lse.float(), padded, math.inf), _head_blocks(delta, padded),
                               dq.view(batch, seq, -1, BLOCK_H, d_qk), dkv, scale, _kernel_upper(q, kv, upper))
    if padded != heads:
        dq = dq[:, :, :heads].contiguous()
    return dq, dkv
