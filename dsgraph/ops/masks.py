"""Symbolic masks: ops that name a mask instead of spelling it.

The masks pass replaces the eager code that builds a causal/banded or top-k mask by one of these
ops. They still compute the mask (so a graph whose attention is not fused stays correct), but their
arguments say what the mask is, so the attention pass folds them into ``dsgraph::attention`` and the
S x T tensor is never built.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dtensor import reject_dtensor


def band_allowed(rows: int, cols: int, lower: Optional[int], upper: Optional[int], device) -> Tensor:
    """[rows, cols] bool: True where ``lower <= j - i <= upper``."""
    diff = torch.arange(cols, device=device)[None, :] - torch.arange(rows, device=device)[:, None]
    allowed = torch.ones(rows, cols, dtype=torch.bool, device=device)
    if lower is not None:
        allowed &= diff >= lower
    if upper is not None:
        allowed &= diff <= upper
    return allowed


@torch.library.custom_op("dsgraph::band_mask", mutates_args=())
def band_mask(rows: int, cols: int, lower: Optional[int], upper: Optional[int], dtype: torch.dtype,
              masked_value: float, invert: bool, device: torch.device) -> Tensor:
    """Bool masks: allowed positions (``invert``: blocked positions). Float masks: additive, 0 where
    allowed and ``masked_value`` where blocked."""
    allowed = band_allowed(rows, cols, lower, upper, device)
    if dtype == torch.bool:
        return ~allowed if invert else allowed
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.tensor(masked_value, dtype=dtype, device=device))


@band_mask.register_fake
def _(rows, cols, lower, upper, dtype, masked_value, invert, device):
    return torch.empty(rows, cols, dtype=dtype, device=device)


@torch.library.custom_op("dsgraph::topk_mask", mutates_args=())
def topk_mask(index: Tensor, cols: int, dtype: torch.dtype, masked_value: float) -> Tensor:
    """Additive mask [..., cols]: 0 at the ``index`` [..., K] positions, ``masked_value`` elsewhere."""
    full = torch.full((*index.shape[:-1], cols), masked_value, dtype=dtype, device=index.device)
    return full.scatter(-1, index, 0.0)


@topk_mask.register_fake
def _(index, cols, dtype, masked_value):
    return index.new_empty((*index.shape[:-1], cols), dtype=dtype)


reject_dtensor("topk_mask")  # band_mask takes no tensors
