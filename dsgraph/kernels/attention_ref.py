"""Torch reference for ``dsgraph::attention``: the CPU path and the oracle of the kernels' tests.

Semantics (shared with ``attention_triton``): ``q [B, Hq, S, D]``, ``k [B, Hkv, T, D]``,
``v [B, Hkv, T, Dv]``, query head h reads kv head ``h // (Hq // Hkv)``. Scores
``s_ij = scale * q_i . k_j + bias_ij`` in fp32; (i, j) is allowed iff ``lower <= j - i <= upper``
(None: unbounded) and, with ``topk [B, S, K]``, j is one of row i's indices. ``sink [Hq]`` is an extra
softmax column with a zero value slot. Returns ``out [B, Hq, S, Dv]`` (q.dtype) and
``lse [B, Hq, S]`` (fp32, including the sink). A row with no allowed key and no sink gets NaN out
and lse = -inf, like eager softmax of an all -inf row; its gradient contributions are zero.

Memory: queries are processed in chunks of ``block_q`` rows, so at most [B, Hq, block_q, T] fp32
scores are alive; GQA goes through a [B, Hkv, G, rows, D] view of q, k/v are never repeated.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.masks import band_allowed
from .common import check_additive_bias

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_attention_args(q: Tensor, k: Tensor, v: Tensor, *, sink: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None, topk: Optional[Tensor] = None) -> None:
    """Raise ValueError naming the argument and the accepted form for malformed inputs."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-d [B, H, S, D]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, hq, seq, dim = q.shape
    _, hkv, keys, _ = k.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if v.shape[1] != hkv or v.shape[2] != keys:
        raise ValueError(f"k [B, Hkv, T, D] {tuple(k.shape)} and v [B, Hkv, T, Dv] {tuple(v.shape)} "
                         "must agree on Hkv and T")
    if k.shape[3] != dim:
        raise ValueError(f"head dims differ: q has D={dim}, k has D={k.shape[3]}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads Hq={hq} must be a positive multiple of kv heads Hkv={hkv}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {_DTYPES}; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if sink is not None and tuple(sink.shape) != (hq,):
        raise ValueError(f"sink must have shape [Hq] = ({hq},); got {tuple(sink.shape)}")
    check_additive_bias(bias, (batch, hq, seq, keys), "[B, Hq, S, T]")
    if topk is not None and (topk.dim() != 3 or tuple(topk.shape[:2]) != (batch, seq)
                             or topk.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"topk must be an int32/int64 tensor [B, S, K] with B={batch}, S={seq}; "
                         f"got {topk.dtype} {tuple(topk.shape)}")


def _chunk_scores(q: Tensor, kf: Tensor, rows: slice, *, scale, bias, lower, upper, topk) -> Tensor:
    """Masked fp32 scores of query rows ``rows``: [B, Hkv, G, rows, T] (masked entries -inf)."""
    batch, hq, _, dim = q.shape
    hkv, keys = kf.shape[1], kf.shape[2]
    qc = q[:, :, rows].float()
    nrows = qc.shape[2]
    qc = qc.view(batch, hkv, hq // hkv, nrows, dim)
    s = torch.einsum("bhgid,bhjd->bhgij", qc, kf) * scale
    if bias is not None:
        s = s + bias.expand(batch, hq, q.shape[2], keys)[:, :, rows].float().reshape(s.shape)
    shift = rows.start  # band_allowed numbers rows from 0
    allowed = band_allowed(nrows, keys, None if lower is None else lower + shift,
                           None if upper is None else upper + shift, q.device)
    if topk is not None:
        picked = torch.zeros(batch, nrows, keys, dtype=torch.bool, device=q.device)
        picked.scatter_(-1, topk[:, rows].long(), True)
        allowed = allowed & picked[:, None, None]
    return s.masked_fill(~allowed, float("-inf"))


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, scale: float, sink: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, lower: Optional[int] = None,
                  upper: Optional[int] = None, topk: Optional[Tensor] = None,
                  block_q: int = 128) -> tuple[Tensor, Tensor]:
    check_attention_args(q, k, v, sink=sink, bias=bias, topk=topk)
    batch, hq, seq, _ = q.shape
    hkv = k.shape[1]
    kf, vf = k.float(), v.float()
    out = q.new_empty(batch, hq, seq, v.shape[3])
    lse = torch.empty(batch, hq, seq, dtype=torch.float32, device=q.device)
    sink_col = None if sink is None else sink.float().view(1, hkv, hq // hkv, 1)
    for start in range(0, seq, block_q):
        rows = slice(start, min(seq, start + block_q))
        s = _chunk_scores(q, kf, rows, scale=scale, bias=bias, lower=lower, upper=upper, topk=topk)
        m = s.logsumexp(-1)
        if sink_col is not None:
            m = torch.logaddexp(m, sink_col)
        p = torch.exp(s - m[..., None])  # NaN on rows with nothing allowed, as eager softmax
        out[:, :, rows] = torch.einsum("bhgij,bhjd->bhgid", p, vf).flatten(1, 2).to(out.dtype)
        lse[:, :, rows] = m.flatten(1, 2)
    return out, lse


def attention_ref_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, *,
                           scale: float, sink: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                           lower: Optional[int] = None, upper: Optional[int] = None,
                           topk: Optional[Tensor] = None, block_q: int = 128):
    """Flash-style backward: p is recomputed from lse chunk by chunk. Returns (dq, dk, dv, dsink);
    dsink is None without a sink. Rows with nothing allowed (lse = -inf) contribute nothing.
    ``out`` is not read (delta comes from p and dp); it keeps the signature of the kernels'."""
    check_attention_args(q, k, v, sink=sink, bias=bias, topk=topk)
    seq, dim = q.shape[2:]
    kf, vf = k.float(), v.float()
    empty = lse == float("-inf")
    lse_p = torch.where(empty, float("inf"), lse)  # makes p = 0 on empty rows instead of NaN
    # delta = rowsum(p * dp) in fp32, as eager autograd computes it; rowsum(dout * out) (the flash
    # kernels' form) would read the output after its rounding to bf16.
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for start in range(0, seq, block_q):
        rows = slice(start, min(seq, start + block_q))
        s = _chunk_scores(q, kf, rows, scale=scale, bias=bias, lower=lower, upper=upper, topk=topk)
        shape = s.shape[:4]
        p = torch.exp(s - lse_p[:, :, rows].reshape(shape)[..., None])
        do = dout[:, :, rows].float().reshape(*shape, -1)
        dv += torch.einsum("bhgij,bhgid->bhjd", p, do)
        dp = torch.einsum("bhgid,bhjd->bhgij", do, vf)
        row_delta = (p * dp).sum(-1)
        delta[:, :, rows] = row_delta.flatten(1, 2)
        ds = p * (dp - row_delta[..., None])
        qc = q[:, :, rows].float().reshape(*shape, dim)
        dq[:, :, rows] = (scale * torch.einsum("bhgij,bhjd->bhgid", ds, kf)).flatten(1, 2).to(dq.dtype)
        dk += scale * torch.einsum("bhgij,bhgid->bhjd", ds, qc)
    dsink = None
    if sink is not None:
        dsink = -(torch.exp(sink.float()[None, :, None] - lse) * delta).sum((0, 2)).to(sink.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dsink
