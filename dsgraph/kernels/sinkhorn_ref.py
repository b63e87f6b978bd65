"""Torch reference for ``dsgraph::sinkhorn`` (the test oracle): the eager loop of
``dsgraph/ops/sinkhorn.py`` and, for the backward, autograd through that same loop.

The backward recomputes the loop under autograd in chunks of at most ``CHUNK_ELEMENTS`` logits, so
the iterates autograd keeps (2·iters per matrix) stay bounded whatever the number of matrices.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import with_autograd

CHUNK_ELEMENTS = 1 << 20


def sinkhorn_loop(logits: Tensor, iters: int, eps: float, row_first: bool = False) -> Tensor:
    """The definition, in ``promote_types(logits.dtype, float32)``."""
    c = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1) + eps
    if row_first:
        c = c / (c.sum(-1, keepdim=True) + eps)
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def sinkhorn_ref(logits: Tensor, iters: int, eps: float, row_first: bool = False) -> Tensor:
    return sinkhorn_loop(logits, iters, eps, row_first)


def sinkhorn_ref_backward(logits: Tensor, grad: Tensor, iters: int, eps: float, row_first: bool = False) -> Tensor:
    """d(loss)/d(logits) in logits' dtype, given ``grad`` = d(loss)/d(sinkhorn(logits))."""
    m = logits.shape[-1]
    mats, grads = logits.reshape(-1, m, m), grad.reshape(-1, m, m)
    out = torch.empty(mats.shape, dtype=logits.dtype, device=logits.device)
    step = max(1, CHUNK_ELEMENTS // (m * m))
    with with_autograd(), torch.enable_grad():
        for start in range(0, mats.shape[0], step):
            leaf = mats[start:start + step].detach().requires_grad_()
            c = sinkhorn_loop(leaf, iters, eps, row_first)
            (out[start:start + step],) = torch.autograd.grad(c, leaf, grads[start:start + step].to(c.dtype))
    return out.view(logits.shape)
