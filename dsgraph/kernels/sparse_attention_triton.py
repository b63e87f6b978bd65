"""Triton kernels of ``dsgraph::sparse_attention`` (forward and backward; semantics in
``sparse_attention_ref``): portable, and run on CPU tensors under ``TRITON_INTERPRET=1``.

One program per (query, kv head, block of BLOCK_H query heads sharing that kv head): it walks the
query's K indices in blocks of BLOCK_N, gathers those key rows once for all its heads, and keeps a
fused online softmax. Head dims that are not powers of two (576 = 512 + 64) are walked in BLOCK_D
chunks; the forward splits the value dim over programs (BLOCK_DV), recomputing the scores per chunk,
so the accumulator stays in registers. With BLOCK_H >= 16 the products are tensor-core ``tl.dot``s
(latent/MQA mode, GQA); smaller head groups (MHA mode) use broadcast products. Any head count, any K,
T < K, -1 / out-of-range / causally invalid entries (skipped) are served.

An attention sink (one more softmax column per head that adds no value) is folded into the epilogue:
lse' = logaddexp(lse, sink), out = acc * exp(m - lse').

Backward: p is recomputed from lse (which includes the sink, so the kernel needs no sink term); dq accumulates in fp32 inside the program that owns the query,
dk/dv are scattered into fp32 buffers with atomic adds (latent mode: the values' gradient lands in
the first d_v dims of dk). delta = rowsum(dout * out) in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention_triton import _INTERPRET, LN2, LOG2E, _dot
from .common import triton_device_reason
from .sparse_attention_ref import check_sparse_attention_args

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _keys(IDX, s, n0, NK, T, upper, HAS_UPPER: tl.constexpr, BLOCK_N: tl.constexpr):
    """Block of a query's indices: (row index, valid) with invalid entries pointed at row 0."""
    offs = n0 + tl.arange(0, BLOCK_N)
    idx = tl.load(IDX + offs, mask=offs < NK, other=-1).to(tl.int64)
    valid = (offs < NK) & (idx >= 0) & (idx < T)
    if HAS_UPPER:
        valid = valid & (idx <= s + upper)
    return tl.where(valid, idx, 0), valid


@triton.jit
def _bias(Brow, n0, NK, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The entries' additive bias in log2 units (0 without one)."""
    offs = n0 + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        return tl.load(Brow + offs, mask=offs < NK, other=0.0) * LOG2E
    return tl.zeros([BLOCK_N], dtype=tl.float32)


@triton.jit
def _scores(Qrow, Krow, idx, valid, heads_ok, sqh, skt, D: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """q . k for BLOCK_H heads x BLOCK_N gathered keys, over D in BLOCK_D chunks: [BLOCK_H, BLOCK_N] fp32."""
    acc = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    hq = tl.arange(0, BLOCK_H)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(Qrow + hq[:, None] * sqh + offs_d[None, :], mask=heads_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        k = tl.load(Krow + idx[:, None] * skt + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
        if USE_DOT:
            acc = _dot(q, tl.trans(k), acc, PREC)
        else:
            acc += tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _fwd_kernel(Q, K, V, IDX, BIAS, SINK, O, LSE, scale_log2, S, T, NK, upper,
                sqb, sqs, sqh, skb, skt, skh, svb, svt, svh, sib, sis, sob, sos, soh, slb, sls,
                G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_SINK: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                USE_DOT: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, s = pid // S, pid % S
    head_blocks: tl.constexpr = (G + BLOCK_H - 1) // BLOCK_H
    kvh = tl.program_id(1) // head_blocks
    h_in = (tl.program_id(1) % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    heads_ok = h_in < G
    h0 = kvh * G + (tl.program_id(1) % head_blocks) * BLOCK_H
    offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    Qrow = Q + b * sqb + s * sqs + h0 * sqh
    Krow = K + b * skb + kvh * skh
    Vrow = V + b * svb + kvh * svh
    Irow = IDX + b * sib + s * sis
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        idx, valid = _keys(Irow, s, n0, NK, T, upper, HAS_UPPER, BLOCK_N)
        x = _scores(Qrow, Krow, idx, valid, heads_ok, sqh, skt, D, BLOCK_H, BLOCK_N, BLOCK_D, USE_DOT, PREC)
        x = x * scale_log2 + _bias(BIAS + b * sib + s * sis, n0, NK, HAS_BIAS, BLOCK_N)[None, :]
        x = tl.where(valid[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(x - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(Vrow + idx[:, None] * svt + offs_dv[None, :], mask=valid[:, None] & dv_ok[None, :], other=0.0)
        if USE_DOT:
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PREC)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m = m_new
    has = l > 0
    lse2 = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))  # log2 units
    if HAS_SINK:  # one more softmax column: lse2 = log2(2^lse2 + 2^sink2); a row without keys gets sink2
        sink2 = tl.load(SINK + h0 + tl.arange(0, BLOCK_H), mask=heads_ok, other=0.0).to(tl.float32) * LOG2E
        hi = tl.maximum(lse2, sink2)
        hi = tl.where(hi == float("-inf"), 0.0, hi)
        lse2 = hi + tl.log2(tl.exp2(lse2 - hi) + tl.exp2(sink2 - hi))
    out = acc * tl.where(has, tl.exp2(m - tl.where(has, lse2, 0.0)), 0.0)[:, None]  # no -inf - -inf
    Orow = O + b * sob + s * sos + h0 * soh
    tl.store(Orow + tl.arange(0, BLOCK_H)[:, None] * soh + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=heads_ok[:, None] & dv_ok[None, :])
    if tl.program_id(2) == 0:
        tl.store(LSE + b * slb + s * sls + h0 + tl.arange(0, BLOCK_H), lse2 * LN2, mask=heads_ok)


@triton.jit
def _bwd_kernel(Q, K, V, IDX, BIAS, DO, LSE, DELTA, DQ, DK, DV, scale, S, T, NK, upper,
                sqb, sqs, sqh, skb, skt, skh, svb, svt, svh, sib, sis, sob, sos, soh, slb, sls,
                G: tl.constexpr, D: tl.constexpr, DVD: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """DQ/DK/DV are fp32 buffers laid out like Q/K/V (DV like V, or DK itself in latent mode)."""
    pid = tl.program_id(0).to(tl.int64)
    b, s = pid // S, pid % S
    head_blocks: tl.constexpr = (G + BLOCK_H - 1) // BLOCK_H
    kvh = tl.program_id(1) // head_blocks
    hq = tl.arange(0, BLOCK_H)
    heads_ok = (tl.program_id(1) % head_blocks) * BLOCK_H + hq < G
    h0 = kvh * G + (tl.program_id(1) % head_blocks) * BLOCK_H
    Qrow = Q + b * sqb + s * sqs + h0 * sqh
    DQrow = DQ + b * sqb + s * sqs + h0 * sqh
    Krow = K + b * skb + kvh * skh
    DKrow = DK + b * skb + kvh * skh
    Vrow = V + b * svb + kvh * svh
    DVrow = DV + b * svb + kvh * svh
    DOrow = DO + b * sob + s * sos + h0 * soh
    Irow = IDX + b * sib + s * sis
    lse = tl.load(LSE + b * slb + s * sls + h0 + hq, mask=heads_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # p = 0 on rows with no valid key
    delta = tl.load(DELTA + b * slb + s * sls + h0 + hq, mask=heads_ok, other=0.0)
    for n0 in range(0, NK, BLOCK_N):
        idx, valid = _keys(Irow, s, n0, NK, T, upper, HAS_UPPER, BLOCK_N)
        x = _scores(Qrow, Krow, idx, valid, heads_ok, sqh, skt, D, BLOCK_H, BLOCK_N, BLOCK_D, USE_DOT, PREC)
        x = x * (scale * LOG2E) + _bias(BIAS + b * sib + s * sis, n0, NK, HAS_BIAS, BLOCK_N)[None, :]
        p = tl.where(valid[None, :], tl.exp2(x - lse2[:, None]), 0.0)
        # dp = dO . v over the value dim, then the value gradient p^T dO chunk by chunk
        dp = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, DVD, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            ok_d = offs_d < DVD
            do = tl.load(DOrow + hq[:, None] * soh + offs_d[None, :], mask=heads_ok[:, None] & ok_d[None, :], other=0.0)
            v = tl.load(Vrow + idx[:, None] * svt + offs_d[None, :], mask=valid[:, None] & ok_d[None, :], other=0.0)
            if USE_DOT:
                dp = _dot(do, tl.trans(v), dp, PREC)
                dv = _dot(tl.trans(p.to(do.dtype)), do, tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), PREC)
            else:
                dp += tl.sum(do.to(tl.float32)[:, None, :] * v.to(tl.float32)[None, :, :], axis=2)
                dv = tl.sum(p[:, :, None] * do.to(tl.float32)[:, None, :], axis=0)
            tl.atomic_add(DVrow + idx[:, None] * svt + offs_d[None, :], dv, mask=valid[:, None] & ok_d[None, :])
        ds = p * (dp - delta[:, None]) * scale
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            ok_d = offs_d < D
            q_ptr = hq[:, None] * sqh + offs_d[None, :]
            q_ok = heads_ok[:, None] & ok_d[None, :]
            k = tl.load(Krow + idx[:, None] * skt + offs_d[None, :], mask=valid[:, None] & ok_d[None, :], other=0.0)
            q = tl.load(Qrow + q_ptr, mask=q_ok, other=0.0)
            if USE_DOT:
                dq = _dot(ds.to(k.dtype), k, tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32), PREC)
                dk = _dot(tl.trans(ds.to(q.dtype)), q, tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), PREC)
            else:
                dq = tl.sum(ds[:, :, None] * k.to(tl.float32)[None, :, :], axis=1)
                dk = tl.sum(ds[:, :, None] * q.to(tl.float32)[:, None, :], axis=0)
            # this program alone owns these dq rows: a plain read-modify-write
            tl.store(DQrow + q_ptr, tl.load(DQrow + q_ptr, mask=q_ok, other=0.0) + dq, mask=q_ok)
            tl.atomic_add(DKrow + idx[:, None] * skt + offs_d[None, :], dk, mask=valid[:, None] & ok_d[None, :])


def _blocks(q: Tensor, hkv: int) -> dict:
    group = q.shape[2] // hkv
    block_h = min(64, triton.next_power_of_2(group))
    if _INTERPRET:
        return dict(BLOCK_H=block_h, BLOCK_N=16, BLOCK_D=16, USE_DOT=block_h >= 16)
    return dict(BLOCK_H=block_h, BLOCK_N=32 if block_h >= 16 else 16, BLOCK_D=64, USE_DOT=block_h >= 16)


def _prec(q: Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def triton_unsupported_reason(q, k, v, indices, *, bias=None, sink=None, scale=None, d_v=None,
                              upper=None) -> Optional[str]:
    """None when the Triton kernels can serve the call, else a one-line reason."""
    if q.dtype not in _DTYPES:
        return f"dtype {str(q.dtype).removeprefix('torch.')} (the triton kernels take float16, bfloat16, float32)"
    return triton_device_reason((q, k, v, indices, bias, sink), _INTERPRET, "triton sparse attention kernels")


def _strides(q, k, v, indices, out, lse):
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *indices.stride()[:2], *out.stride()[:3],
            *lse.stride()[:2])


def sparse_attention_triton(q: Tensor, k: Tensor, v: Optional[Tensor], indices: Tensor, *, scale: float, d_v: int,
                            upper: Optional[int] = None, bias: Optional[Tensor] = None,
                            sink: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    check_sparse_attention_args(q, k, v, indices, d_v, bias, sink)
    q, k, indices = q.contiguous(), k.contiguous(), indices.contiguous()
    has_bias, has_sink = bias is not None, sink is not None
    bias = bias.contiguous() if has_bias else indices  # a placeholder pointer without one
    sink = sink.contiguous() if has_sink else indices
    vv = k if v is None else v.contiguous()
    batch, seq, heads, dim = q.shape
    hkv = k.shape[2]
    out = q.new_empty(batch, seq, heads, d_v)
    lse = torch.empty(batch, seq, heads, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    blocks = _blocks(q, hkv)
    block_dv = min(128 if not _INTERPRET else 16, triton.next_power_of_2(d_v))
    head_blocks = triton.cdiv(heads // hkv, blocks["BLOCK_H"])
    grid = (batch * seq, hkv * head_blocks, triton.cdiv(d_v, block_dv))
    _fwd_kernel[grid](q, k, vv, indices, bias, sink, out, lse, scale * 1.4426950408889634, seq, k.shape[1], indices.shape[2],
                      0 if upper is None else upper, *_strides(q, k, vv, indices, out, lse),
                      G=heads // hkv, D=dim, DV=d_v, HAS_UPPER=upper is not None, HAS_BIAS=has_bias,
                      HAS_SINK=has_sink, BLOCK_DV=block_dv,
                      PREC=_prec(q), **blocks)
    return out, lse


def sparse_attention_triton_backward(q: Tensor, k: Tensor, v: Optional[Tensor], out: Tensor, lse: Tensor,
                                     dout: Tensor, indices: Tensor, *, scale: float, d_v: int,
                                     upper: Optional[int] = None, bias: Optional[Tensor] = None,
                                     sink: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``sink`` is only checked: lse includes it (see the module docstring)."""
    check_sparse_attention_args(q, k, v, indices, d_v, bias, sink)
    q, k, indices, dout, lse = q.contiguous(), k.contiguous(), indices.contiguous(), dout.contiguous(), lse.contiguous()
    vv = k if v is None else v.contiguous()
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else indices
    batch, seq, heads, dim = q.shape
    hkv = k.shape[2]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = dk if v is None else torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    if dq.numel() and indices.shape[2]:
        delta = (dout.float() * out.float()).sum(-1)
        blocks = _blocks(q, hkv)
        grid = (batch * seq, hkv * triton.cdiv(heads // hkv, blocks["BLOCK_H"]))
        _bwd_kernel[grid](q, k, vv, indices, bias, dout, lse, delta, dq, dk, dv, scale, seq, k.shape[1], indices.shape[2],
                          0 if upper is None else upper, *_strides(q, k, vv, indices, dout, lse),
                          G=heads // hkv, D=dim, DVD=d_v, HAS_UPPER=upper is not None, HAS_BIAS=has_bias, PREC=_prec(q), **blocks)
    return dq.to(q.dtype), dk.to(k.dtype), None if v is None else dv.to(v.dtype)
