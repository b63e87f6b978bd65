"""``dsgraph::hadamard``: the Walsh–Hadamard rotation over the last dim.

``hadamard(x [..., n], scale, backend) -> scale * (x @ H_n)`` with H_n the Sylvester Hadamard matrix
(symmetric, H_n H_n = n I), n a power of two in [1, MAX_SIZE]; the math is in at least fp32 and the
result is cast back to x.dtype (as ``models/deepseek_v32.py:hadamard_transform_torch``). The
transform is self-adjoint, so the backward is the same op on the incoming gradient, same backend.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..registry import KernelImpl, kernel, register_kernel
from .dtensor import reject_dtensor

MAX_SIZE = 1 << 15
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_hadamard_args(x: Tensor, scale: float) -> None:
    """Raise a ValueError naming the argument when ``x`` is outside what every backend accepts."""
    if x.dim() < 1:
        raise ValueError("dsgraph::hadamard: x must have at least one dim (the rotated last dim), got a 0-dim tensor")
    n = x.shape[-1]
    if n < 1 or n > MAX_SIZE or n & (n - 1):
        raise ValueError(f"dsgraph::hadamard: x.shape[-1] must be a power of 2 in [1, {MAX_SIZE}], got {n} "
                         f"(x of shape {tuple(x.shape)})")
    if x.dtype not in DTYPES:
        raise ValueError(f"dsgraph::hadamard: x.dtype must be one of {', '.join(map(str, DTYPES))}, got {x.dtype}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"dsgraph::hadamard: scale must be a finite number, got {scale!r}")


@torch.library.custom_op("dsgraph::hadamard", mutates_args=())
def hadamard(x: Tensor, scale: float, backend: str) -> Tensor:
    check_hadamard_args(x, scale)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return kernel("hadamard", backend).forward(x, scale).contiguous()


@hadamard.register_fake
def _(x, scale, backend):
    check_hadamard_args(x, scale)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, scale, backend = inputs
    ctx.params = (scale, backend)


def _backward(ctx, grad):
    # H_n is symmetric, so d(scale * x H)/dx applied to grad is scale * grad H: the op again.
    return torch.ops.dsgraph.hadamard(grad, *ctx.params), None, None


hadamard.register_autograd(_backward, setup_context=_setup_context)


def _torch_forward(x, scale):
    from ..kernels.hadamard_ref import hadamard_ref
    return hadamard_ref(x, scale)


def _triton_forward(x, scale):
    from ..kernels.hadamard_triton import hadamard_triton
    return hadamard_triton(x, scale)


def _triton_unsupported(x, scale):
    try:
        from ..kernels.hadamard_triton import triton_unsupported_reason
    except ImportError as exc:  # triton missing or broken: say so, never fail the compile
        return f"triton not importable ({exc})"
    return triton_unsupported_reason(x, scale)


def _tilelang_forward(x, scale):
    from ..kernels.hadamard_tilelang import hadamard_tilelang
    return hadamard_tilelang(x, scale)


def _tilelang_unsupported(x, scale):
    try:
        from ..kernels.hadamard_tilelang import tilelang_unsupported_reason
    except ImportError as exc:
        return f"tilelang not importable ({exc})"
    return tilelang_unsupported_reason(x, scale)


# backward=None: the op's autograd calls the op itself (the transform is self-adjoint).
register_kernel(KernelImpl("hadamard", "torch", _torch_forward, None, unsupported=lambda x, scale: None))
register_kernel(KernelImpl("hadamard", "triton", _triton_forward, None, unsupported=_triton_unsupported))
register_kernel(KernelImpl("hadamard", "tilelang", _tilelang_forward, None, unsupported=_tilelang_unsupported))


reject_dtensor("hadamard")
