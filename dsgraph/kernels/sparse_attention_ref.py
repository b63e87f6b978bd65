"""Torch reference for ``dsgraph::sparse_attention``: the CPU path and the oracle of the kernels' tests.

Semantics (shared with the Triton and TileLang kernels): ``q [B, S, H, D]``, ``k [B, T, Hkv, D]``,
``v [B, T, Hkv, Dv]`` or None (latent/MQA mode: the values are ``k[..., :d_v]``), query head h reads
kv head ``h // (H // Hkv)``, ``indices [B, S, K]`` (int32/int64) name the keys each query attends to.
Entry j of row s is valid iff ``0 <= j < T`` and, with ``upper``, ``j - s <= upper`` (the causal band
``upper = T - S``); invalid entries are skipped. Indices are taken as distinct (a repeated index
counts twice, as in every gather-based kernel). Scores ``scale * q . k + bias`` in fp32 (``bias [B, S, K]``
optional, per entry, shared by the heads; -inf skips the entry); ``sink [H]`` optional: one more
softmax column per row with logit ``sink[h]`` (fp32) that adds no value. Returns ``out [B, S, H, Dv]``
(q.dtype) and ``lse [B, S, H]`` (fp32, natural log-sum-exp of the scaled scores and the sink). A row
with no valid entry gets out = 0 and lse = sink (-inf without one), and no gradient.

Memory: O(rows x K x Hkv x D) per chunk of query rows (the gathered keys), never [S, T].
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Gathered key elements per query chunk (fp32: 256 MiB).
_CHUNK_ELEMENTS = 1 << 26


def check_sparse_attention_args(q: Tensor, k: Tensor, v: Optional[Tensor], indices: Tensor, d_v: int,
                                bias: Optional[Tensor] = None, sink: Optional[Tensor] = None) -> None:
    """Raise ValueError naming the argument and the accepted form for malformed inputs."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"sparse_attention: q [B, S, H, D] and k [B, T, Hkv, D] must be 4-d; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}")
    batch, seq, heads, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"sparse_attention: k {tuple(k.shape)} must be [B={batch}, T, Hkv, D={dim}]")
    hkv = k.shape[2]
    if hkv == 0 or heads % hkv:
        raise ValueError(f"sparse_attention: query heads H={heads} must be a positive multiple of kv heads Hkv={hkv}")
    if v is None:
        if not 0 < d_v <= dim:
            raise ValueError(f"sparse_attention: d_v must be in [1, D={dim}] in latent mode (v None); got {d_v}")
    elif v.dim() != 4 or tuple(v.shape[:3]) != tuple(k.shape[:3]) or v.shape[3] != d_v:
        raise ValueError(f"sparse_attention: v must be [B, T, Hkv, d_v] = {(*k.shape[:3], d_v)}; got {tuple(v.shape)}")
    dtypes = {q.dtype, k.dtype} | ({v.dtype} if v is not None else set())
    if q.dtype not in _DTYPES or len(dtypes) != 1:
        raise ValueError(f"sparse_attention: q, k, v must share one dtype of {_DTYPES}; got "
                         f"{', '.join(map(str, dtypes))}")
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (batch, seq) or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sparse_attention: indices must be an int32/int64 tensor [B, S, K] with B={batch}, "
                         f"S={seq}; got {indices.dtype} {tuple(indices.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != indices.shape):
        raise ValueError(f"sparse_attention: bias must be float32 of the indices' shape {tuple(indices.shape)}; "
                         f"got {bias.dtype} {tuple(bias.shape)}")
    if sink is not None and (not sink.dtype.is_floating_point or tuple(sink.shape) != (heads,)):
        raise ValueError(f"sparse_attention: sink must be a floating-point tensor [H={heads}] (one logit per "
                         f"query head); got {sink.dtype} {tuple(sink.shape)}")


def valid_indices(indices: Tensor, keys: int, upper: Optional[int], first_row: int = 0) -> Tensor:
    """[B, rows, K] bool: entries that name a key the query may attend to."""
    ok = (indices >= 0) & (indices < keys)
    if upper is not None:
        rows = torch.arange(first_row, first_row + indices.shape[1], device=indices.device)
        ok &= indices <= rows[None, :, None] + upper
    return ok


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, T, Hkv, E], idx [B, rows, K] (valid range) -> [B, rows, K, Hkv, E] fp32."""
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[batch, idx].float()


def _rows_per_chunk(k: Tensor, indices: Tensor) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, indices.shape[2] * k.shape[2] * k.shape[3]))


def _chunk(q, k, v, indices, bias, rows, *, scale, d_v, upper):
    """Gathered keys/values, masked scores [B, r, Hkv, G, K] and the validity mask of query ``rows``."""
    batch, _, heads, dim = q.shape
    hkv = k.shape[2]
    idx = indices[:, rows].long()
    ok = valid_indices(idx, k.shape[1], upper, rows.start)
    idx = idx.where(ok, 0)
    kg = _gather(k, idx)                                          # [B, r, K, Hkv, D]
    vg = kg[..., :d_v] if v is None else _gather(v, idx)          # [B, r, K, Hkv, Dv]
    qc = q[:, rows].float().view(batch, -1, hkv, heads // hkv, dim)
    s = torch.einsum("brhgd,brkhd->brhgk", qc, kg) * scale
    if bias is not None:
        s = s + bias[:, rows, None, None, :]
    s = s.masked_fill(~ok[:, :, None, None, :], float("-inf"))
    return qc, kg, vg, s, idx, ok


def sparse_attention_ref(q: Tensor, k: Tensor, v: Optional[Tensor], indices: Tensor, *, scale: float, d_v: int,
                         upper: Optional[int] = None, bias: Optional[Tensor] = None, sink: Optional[Tensor] = None,
                         block_q: Optional[int] = None) -> tuple[Tensor, Tensor]:
    check_sparse_attention_args(q, k, v, indices, d_v, bias, sink)
    batch, seq, heads, _ = q.shape
    hkv = k.shape[2]
    out = q.new_empty(batch, seq, heads, d_v)
    lse = torch.empty(batch, seq, heads, dtype=torch.float32, device=q.device)
    step = block_q or _rows_per_chunk(k, indices)
    for start in range(0, seq, step):
        rows = slice(start, min(seq, start + step))
        _, _, vg, s, _, _ = _chunk(q, k, v, indices, bias, rows, scale=scale, d_v=d_v, upper=upper)
        m = s.logsumexp(-1)                                       # [B, r, Hkv, G]
        if sink is not None:
            m = torch.logaddexp(m, sink.float().view(hkv, heads // hkv))
        p = torch.exp(s - m.where(m.isfinite(), 0.0)[..., None])  # 0 on rows with no valid entry
        o = torch.einsum("brhgk,brkhd->brhgd", p, vg)
        out[:, rows] = o.flatten(2, 3).to(out.dtype)
        lse[:, rows] = m.flatten(2, 3)
    return out, lse


def sparse_attention_ref_backward(q: Tensor, k: Tensor, v: Optional[Tensor], out: Tensor, lse: Tensor, dout: Tensor,
                                  indices: Tensor, *, scale: float, d_v: int, upper: Optional[int] = None,
                                  bias: Optional[Tensor] = None, sink: Optional[Tensor] = None,
                                  block_q: Optional[int] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """p recomputed from lse; the key/value gradients are scattered back with ``index_add_``. Returns
    (dq, dk, dv); in latent mode dv is None and dk holds the values' gradient in its first d_v dims.
    ``out`` is not read (delta = rowsum(p * dp) in fp32, as eager autograd) and ``sink`` only checked:
    lse includes the sink, so p are the probabilities and the sink column (dp = 0) adds nothing to
    delta; they keep the kernels' signature. dsink is the op's (``dsgraph/ops/sparse_attention.py``)."""
    check_sparse_attention_args(q, k, v, indices, d_v, bias, sink)
    batch, seq, heads, dim = q.shape
    keys, hkv = k.shape[1], k.shape[2]
    dq = torch.empty_like(q)
    dk = torch.zeros(batch * keys, hkv, dim, dtype=torch.float32, device=q.device)
    dv = None if v is None else torch.zeros(batch * keys, hkv, d_v, dtype=torch.float32, device=q.device)
    step = block_q or _rows_per_chunk(k, indices)
    lse_p = lse.where(lse.isfinite(), float("inf"))  # p = 0 on rows with no valid entry
    for start in range(0, seq, step):
        rows = slice(start, min(seq, start + step))
        qc, kg, vg, s, idx, _ = _chunk(q, k, v, indices, bias, rows, scale=scale, d_v=d_v, upper=upper)
        shape = s.shape[:4]
        p = torch.exp(s - lse_p[:, rows].reshape(shape)[..., None])
        do = dout[:, rows].float().reshape(*shape, d_v)
        dp = torch.einsum("brhgd,brkhd->brhgk", do, vg)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        dq[:, rows] = (scale * torch.einsum("brhgk,brkhd->brhgd", ds, kg)).flatten(2, 3).to(dq.dtype)
        dkg = scale * torch.einsum("brhgk,brhgd->brkhd", ds, qc)
        dvg = torch.einsum("brhgk,brhgd->brkhd", p, do)
        flat = (idx + torch.arange(batch, device=q.device)[:, None, None] * keys).flatten()
        if v is None:
            dkg[..., :d_v] += dvg
        else:
            dv.index_add_(0, flat, dvg.flatten(0, 2))
        dk.index_add_(0, flat, dkg.flatten(0, 2))
    dk = dk.view(k.shape).to(k.dtype)
    return dq, dk, None if dv is None else dv.view(v.shape).to(v.dtype)
