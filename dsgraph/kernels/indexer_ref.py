"""Torch reference for ``dsgraph::indexer_scores`` / ``dsgraph::indexer_topk``: the CPU path and
the oracle of the kernels' tests (semantics in ``dsgraph/ops/indexer.py``).

Memory: queries are processed in chunks of ``block_q`` rows, so at most [B, block_q, H, T] fp32
logits are alive; neither [B, S, H, T] nor (for top-k) the full [B, S, T] scores are built.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.masks import band_allowed
from .common import check_additive_bias

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_indexer_args(q: Tensor, k: Tensor, weights: Tensor, *, bias: Optional[Tensor] = None,
                       topk: Optional[int] = None) -> None:
    """Raise ValueError naming the argument and the accepted form for malformed inputs."""
    if q.dim() != 4 or k.dim() != 3 or weights.dim() != 3:
        raise ValueError("q must be [B, S, H, D], k [B, T, D], weights [B, S, H]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, weights {tuple(weights.shape)}")
    batch, seq, heads, dim = q.shape
    if k.shape[0] != batch or k.shape[2] != dim:
        raise ValueError(f"k [B, T, D] {tuple(k.shape)} must have B={batch} and D={dim} like q")
    if tuple(weights.shape) != (batch, seq, heads):
        raise ValueError(f"weights must be [B, S, H] = {(batch, seq, heads)}; got {tuple(weights.shape)}")
    for name, t in (("q", q), ("k", k), ("weights", weights)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be one of {_DTYPES}; got {t.dtype}")
    full = (batch, seq, k.shape[1])
    check_additive_bias(bias, full, "[B, S, T]")
    if topk is not None and not 0 <= topk <= k.shape[1]:
        raise ValueError(f"topk must be in [0, T] = [0, {k.shape[1]}]; got {topk}")


def _rows_allowed(rows: slice, keys: int, lower, upper, device) -> Tensor:
    """[rows, T] bool band for query rows ``rows`` (band_allowed numbers rows from 0)."""
    shift = rows.start
    return band_allowed(rows.stop - rows.start, keys, None if lower is None else lower + shift,
                        None if upper is None else upper + shift, device)


def _logits(q: Tensor, kf: Tensor, rows: slice) -> Tensor:
    """fp32 q.k of query rows ``rows``: [B, rows, H, T]."""
    return torch.einsum("bshd,btd->bsht", q[:, rows].float(), kf)


def _chunk_scores(q, kf, weights, rows, bias, lower, upper) -> Tensor:
    logits = _logits(q, kf, rows)
    # The eager expression, so fp32 inputs give eager's bits.
    s = (weights[:, rows].float()[..., None] * torch.relu(logits)).sum(dim=2)
    if bias is not None:
        s = s + bias.expand(q.shape[0], q.shape[1], kf.shape[1])[:, rows].float()
    if lower is None and upper is None:
        return s
    return s.masked_fill(~_rows_allowed(rows, kf.shape[1], lower, upper, q.device), float("-inf"))


def indexer_scores_ref(q: Tensor, k: Tensor, weights: Tensor, *, bias: Optional[Tensor] = None,
                       lower: Optional[int] = None, upper: Optional[int] = None, block_q: int = 64) -> Tensor:
    check_indexer_args(q, k, weights, bias=bias)
    seq, kf = q.shape[1], k.float()
    out = torch.empty(q.shape[0], seq, k.shape[1], dtype=torch.float32, device=q.device)
    for start in range(0, seq, block_q):
        rows = slice(start, min(seq, start + block_q))
        out[:, rows] = _chunk_scores(q, kf, weights, rows, bias, lower, upper)
    return out


def indexer_scores_ref_backward(q: Tensor, k: Tensor, weights: Tensor, dscores: Tensor, *,
                                lower: Optional[int] = None, upper: Optional[int] = None,
                                block_q: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dweights) in the inputs' dtypes; positions outside the band get no gradient, the
    relu's derivative at 0 is 0 (as torch's)."""
    check_indexer_args(q, k, weights)
    seq, kf = q.shape[1], k.float()
    dq = torch.empty_like(q)
    dweights = torch.empty_like(weights)
    dk = torch.zeros_like(kf)
    for start in range(0, seq, block_q):
        rows = slice(start, min(seq, start + block_q))
        logits = _logits(q, kf, rows)
        g = dscores[:, rows].float()
        if lower is not None or upper is not None:
            g = g.masked_fill(~_rows_allowed(rows, k.shape[1], lower, upper, q.device), 0.0)
        dweights[:, rows] = torch.einsum("bst,bsht->bsh", g, torch.relu(logits)).to(weights.dtype)
        dlogits = (g[:, :, None] * weights[:, rows].float()[..., None]) * (logits > 0)
        dq[:, rows] = torch.einsum("bsht,btd->bshd", dlogits, kf).to(q.dtype)
        dk += torch.einsum("bsht,bshd->btd", dlogits, q[:, rows].float())
    return dq, dk.to(k.dtype), dweights


def indexer_topk_ref(q: Tensor, k: Tensor, weights: Tensor, *, topk: int, bias: Optional[Tensor] = None,
                     lower: Optional[int] = None, upper: Optional[int] = None,
                     block_q: int = 64) -> tuple[Tensor, Tensor]:
    """``torch.topk(indexer_scores_ref(...), topk, dim=-1)`` one query chunk at a time."""
    check_indexer_args(q, k, weights, bias=bias, topk=topk)
    batch, seq = q.shape[:2]
    kf = k.float()
    values = torch.empty(batch, seq, topk, dtype=torch.float32, device=q.device)
    indices = torch.empty(batch, seq, topk, dtype=torch.int64, device=q.device)
    for start in range(0, seq, block_q):
        rows = slice(start, min(seq, start + block_q))
        values[:, rows], indices[:, rows] = torch.topk(
            _chunk_scores(q, kf, weights, rows, bias, lower, upper), topk, dim=-1)
    return values, indices
