"""``dsgraph::sinkhorn``: Sinkhorn normalisation of [M, M] logits, as DeepSeek V4's Hyper-Connections do it.

``sinkhorn(logits [..., M, M], iters, eps, backend, row_first=False) -> [..., M, M]``::

    c = softmax(logits, -1) + eps
    c = c / (c.sum(-1, keepdim=True) + eps)          (only with row_first)
    c = c / (c.sum(-2, keepdim=True) + eps)
    iters - 1 times:
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)

``iters`` counts the column normalisations (DeepSeek's ``hc_sinkhorn_iters``: its first iteration is
the softmax's own row normalisation and a column one; ``row_first`` chains start with an explicit row
normalisation). The math is in ``promote_types(logits.dtype, float32)`` and so is the result: fp16 /
bf16 logits are read as fp32 (the widening cast eager code writes before the softmax is part of the
op), fp64 stays fp64 (the torch backend only). Backward (``dsgraph::sinkhorn_backward``, same
backend): the gradient of the logits in their dtype, through every iteration exactly as autograd of
the loop above computes it.

What the backward keeps: nothing but the logits. Saving the iterates (2·iters [.., M, M] per site:
2.5 KB per token at M = 4, iters = 20, two sites a layer, some 8% on top of V4's own [4, 4096] bf16
residual streams) would hold activation memory from forward to backward for values that 2·iters tiny
normalisations in registers recompute. The Triton backward recomputes them in registers too,
walking the iterations backwards in segments restarted from the softmax (no scratch memory).

Kernel interface (``KernelImpl`` of op "sinkhorn"): ``forward(logits, iters, eps, row_first)``;
``backward(logits, grad, iters, eps, row_first)`` -> dlogits; ``unsupported(logits, iters, eps,
row_first)`` -> reason or None. Backends: ``triton`` (one program per block of matrices, all
iterations in registers, M a power of two <= 16), ``torch`` (the eager loop and autograd through it:
serves every valid call and is the oracle).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..registry import KernelImpl, kernel, register_kernel
from .dtensor import reject_dtensor

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def result_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(logits_dtype, torch.float32)


def check_sinkhorn_args(logits: Tensor, iters: int, eps: float, row_first: bool = False) -> None:
    """Raise a ValueError naming the argument when the call is outside what every backend accepts."""
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2] or logits.shape[-1] < 1:
        raise ValueError(f"dsgraph::sinkhorn: logits must be [..., M, M] with M >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in DTYPES:
        raise ValueError(f"dsgraph::sinkhorn: logits dtype must be one of {', '.join(map(str, DTYPES))}, "
                         f"got {logits.dtype}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"dsgraph::sinkhorn: iters must be an integer >= 1, got {iters!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"dsgraph::sinkhorn: eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(row_first, bool):
        raise ValueError(f"dsgraph::sinkhorn: row_first must be True or False, got {row_first!r}")


@torch.library.custom_op("dsgraph::sinkhorn", mutates_args=())
def sinkhorn(logits: Tensor, iters: int, eps: float, backend: str, row_first: bool = False) -> Tensor:
    check_sinkhorn_args(logits, iters, eps, row_first)
    if logits.numel() == 0:
        return logits.new_empty(logits.shape, dtype=result_dtype(logits.dtype))
    return kernel("sinkhorn", backend).forward(logits, iters, eps, row_first).contiguous()


@sinkhorn.register_fake
def _(logits, iters, eps, backend, row_first=False):
    check_sinkhorn_args(logits, iters, eps, row_first)
    return logits.new_empty(logits.shape, dtype=result_dtype(logits.dtype))


@torch.library.custom_op("dsgraph::sinkhorn_backward", mutates_args=())
def sinkhorn_backward(grad: Tensor, logits: Tensor, iters: int, eps: float, backend: str,
                      row_first: bool = False) -> Tensor:
    check_sinkhorn_args(logits, iters, eps, row_first)
    if grad.shape != logits.shape:
        raise ValueError(f"dsgraph::sinkhorn_backward: grad must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(grad.shape)}")
    if logits.numel() == 0:
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    return kernel("sinkhorn", backend).backward(logits, grad, iters, eps, row_first).contiguous()


@sinkhorn_backward.register_fake
def _(grad, logits, iters, eps, backend, row_first=False):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, iters, eps, backend, row_first = inputs
    ctx.save_for_backward(logits)
    ctx.params = (iters, eps, backend, row_first)


def _backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return torch.ops.dsgraph.sinkhorn_backward(grad, logits, *ctx.params), None, None, None, None


sinkhorn.register_autograd(_backward, setup_context=_setup_context)


def _runner(backend: str):
    """Autotune's view of a backend: the op and its backward, as the rewritten graph runs them."""
    def run(logits, iters, eps, row_first=False):
        return sinkhorn(logits, iters, eps, backend, row_first)
    return run


def _torch_forward(*args):
    from ..kernels.sinkhorn_ref import sinkhorn_ref
    return sinkhorn_ref(*args)


def _torch_backward(*args):
    from ..kernels.sinkhorn_ref import sinkhorn_ref_backward
    return sinkhorn_ref_backward(*args)


def _triton_forward(*args):
    from ..kernels.sinkhorn_triton import sinkhorn_triton
    return sinkhorn_triton(*args)


def _triton_backward(*args):
    from ..kernels.sinkhorn_triton import sinkhorn_triton_backward
    return sinkhorn_triton_backward(*args)


def _triton_unsupported(logits, iters, eps, row_first=False):
    try:
        from ..kernels.sinkhorn_triton import triton_unsupported_reason
    except ImportError as exc:  # triton missing or broken: say so, never fail the compile
        return f"triton not importable ({exc})"
    return triton_unsupported_reason(logits, iters, eps, row_first)


def _serves_all(logits, iters, eps, row_first=False):
    return None


register_kernel(KernelImpl("sinkhorn", "torch", _torch_forward, _torch_backward, _serves_all, run=_runner("torch")))
register_kernel(KernelImpl("sinkhorn", "triton", _triton_forward, _triton_backward, _triton_unsupported,
                           run=_runner("triton")))


reject_dtensor("sinkhorn", "sinkhorn_backward")
