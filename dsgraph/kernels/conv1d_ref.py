"""Torch reference for ``dsgraph::causal_conv1d`` (the test oracle), forward and backward, and for
``dsgraph::causal_conv1d_update`` (the decode step's conv state update, forward only).

Written as the K shifted products it is (no ``F.conv1d``), so the tests that compare the rewrite
with eager ``conv1d`` compare two independent computations. Batch rows are processed in chunks of
at most ``CHUNK_ELEMENTS`` so the fp32 working copies stay small.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24


def _compute(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _pre(xp: Tensor, w: Tensor, bias: Optional[Tensor], length: int) -> Tensor:
    """Pre-activation [b, L, C] from the input left-padded with K - 1 zeros, xp [b, L + K - 1, C]."""
    acc = torch.zeros(xp.shape[0], length, xp.shape[2], dtype=xp.dtype, device=xp.device)
    for k in range(w.shape[1]):
        acc += xp[:, k:k + length] * w[:, k]
    return acc if bias is None else acc + bias.to(acc.dtype)


def _step(x: Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, x.shape[1] * x.shape[2]))


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> Tensor:
    _, length, _ = x.shape
    k = weight.shape[1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    w = weight.to(_compute(x))
    step = _step(x)
    for start in range(0, x.shape[0], step):
        xp = F.pad(x[start:start + step].to(w.dtype), (0, 0, k - 1, 0))
        pre = _pre(xp, w, bias, length)
        out[start:start + step] = F.silu(pre) if activation == "silu" else pre
    return out


def causal_conv1d_ref_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
                               dout: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(dx, dweight, dbias or None), each in its input's dtype."""
    _, length, channels = x.shape
    k = weight.shape[1]
    w = weight.to(_compute(x))
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.zeros(channels, k, dtype=w.dtype, device=x.device)
    db = torch.zeros(channels, dtype=w.dtype, device=x.device)
    step = _step(x)
    for start in range(0, x.shape[0], step):
        xp = F.pad(x[start:start + step].to(w.dtype), (0, 0, k - 1, 0))
        dpre = dout[start:start + step].to(w.dtype)
        if activation == "silu":
            pre = _pre(xp, w, bias, length)
            sig = torch.sigmoid(pre)
            dpre = dpre * sig * (1 + pre * (1 - sig))
        db += dpre.sum((0, 1))
        for j in range(k):
            dw[:, j] += (dpre * xp[:, j:j + length]).sum((0, 1))
        # dx[s] = sum_k w[k] dpre[s + K - 1 - k]: dpre right-padded with K - 1 zeros
        dp = F.pad(dpre, (0, 0, 0, k - 1))
        acc = torch.zeros_like(dpre)
        for j in range(k):
            acc += dp[:, k - 1 - j:k - 1 - j + length] * w[:, j]
        dx[start:start + step] = acc
    return dx, dw.to(weight.dtype), None if bias is None else db.to(bias.dtype)


def causal_conv1d_update_ref(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                             activation: Optional[str]) -> tuple[Tensor, Tensor]:
    """(out [B, L, C], new_state [B, C, K - 1]) in x.dtype: the conv of the window [state, x]."""
    batch, length, _ = x.shape
    # [B, K - 1 + L, C]: the window the causal conv reads, the state already rounded to x.dtype
    window = torch.cat([conv_state.to(x.dtype).transpose(1, 2), x], dim=1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    w = weight.to(_compute(x))
    step = _step(window)
    for start in range(0, batch, step):
        pre = _pre(window[start:start + step].to(w.dtype), w, bias, length)
        out[start:start + step] = F.silu(pre) if activation == "silu" else pre
    return out, window[:, length:].transpose(1, 2).contiguous()
