"""Torch reference for ``dsgraph::hadamard`` (the test oracle): the O(n log n) butterfly.

Rows are rotated in chunks of at most ``CHUNK_ELEMENTS`` so the fp32 working copy stays small
whatever the input size; each of the log2(n) stages updates pairs (i, i + h) in place, needing one
temporary of half a chunk. The product of the stages I ⊗ H_2 ⊗ I over h = n/2, ..., 1 is H_2^{⊗k},
the Sylvester matrix.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24


def hadamard_ref(x: Tensor, scale: float) -> Tensor:
    """``scale * (x @ H_n)`` over the last dim, math in ``promote_types(x.dtype, float32)``."""
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows_in, rows_out = x.reshape(-1, n), out.view(-1, n)
    compute = torch.promote_types(x.dtype, torch.float32)
    step = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, rows_in.shape[0], step):
        y = rows_in[start:start + step].to(compute, copy=True)
        h = n // 2
        while h >= 1:
            pairs = y.view(y.shape[0], n // (2 * h), 2, h)
            a, b = pairs[:, :, 0], pairs[:, :, 1]
            a_old = a.clone()
            a.add_(b)
            b.sub_(a_old).neg_()  # b <- a_old - b
            h //= 2
        rows_out[start:start + step] = y.mul_(scale)
    return out
