"""Torch reference for ``dsgraph::window_pool`` (the test oracle): the definition in
``dsgraph/ops/window_pool.py`` written out with torch ops, and autograd through it for the backward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import with_autograd


def overlap_slots(t: Tensor, fill: float) -> Tensor:
    """[B, P, r, 2d] -> [B, P, 2r, d]: window n's slots r.. are its own tokens' second half, slots ..r
    window n - 1's first half (``fill`` for window 0). Out of place, so autograd sees it whole."""
    B, P, r, two_d = t.shape
    d = two_d // 2
    prev = torch.cat([t.new_full((B, min(P, 1), r, d), fill), t[:, :-1, :, :d]], dim=1)
    return torch.cat([prev, t[..., d:]], dim=2)


def window_pool_math(kv: Tensor, score: Tensor, ape: Optional[Tensor], ratio: int, overlap: bool) -> Tensor:
    """The definition, in fp32 (fp64 for fp64 inputs)."""
    from ..ops.window_pool import compute_dtype
    dtype = compute_dtype(kv, score, ape)
    B, N, w = kv.shape
    P = N // ratio
    k = kv[:, :P * ratio].to(dtype).unflatten(1, (P, ratio))
    s = score[:, :P * ratio].to(dtype).unflatten(1, (P, ratio))
    if ape is not None:
        s = s + ape.to(dtype)
    if overlap:
        k, s = overlap_slots(k, 0.0), overlap_slots(s, float("-inf"))
    return (k * s.softmax(dim=2)).sum(dim=2)


def window_pool_ref(kv: Tensor, score: Tensor, ape: Optional[Tensor], ratio: int, overlap: bool,
                    out_dtype: torch.dtype) -> Tensor:
    return window_pool_math(kv, score, ape, ratio, overlap).to(out_dtype)


def window_pool_ref_backward(kv: Tensor, score: Tensor, ape: Optional[Tensor], grad: Tensor, ratio: int,
                             overlap: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dkv, dscore, dape) given ``grad`` = d(loss)/d(pooled); dape is fp32 zeros-shaped [r, w] when
    ape is None."""
    leaves = [t.detach().requires_grad_() for t in (kv, score)]
    ape_leaf = (torch.zeros(ratio, kv.shape[-1], device=kv.device) if ape is None else ape).detach().requires_grad_()
    with with_autograd(), torch.enable_grad():
        out = window_pool_math(*leaves, ape_leaf, ratio, overlap)
        dkv, dscore, dape = torch.autograd.grad(out, [*leaves, ape_leaf], grad.to(out.dtype))
    return dkv, dscore, dape
