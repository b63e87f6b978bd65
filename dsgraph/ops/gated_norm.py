"""``dsgraph::gated_rmsnorm``: RMSNorm over groups of channels of ``x · silu(gate)``, times a weight.

``gated_rmsnorm(x [..., D], gate [..., D] or None, weight [D], eps, group_size, out_dtype, backend)``::

    u = x · silu(gate)                       (u = x without a gate)
    out[..., j] = u[..., j] · rsqrt(mean(u[..., group(j)]²) + eps) · weight[j]

with the groups ``group_size`` consecutive channels (``norm_before_gate=False`` in mamba-ssm's
terms; group_size = D is a plain gated RMSNorm). The math is fp32 (fp64 for fp64 inputs) whatever
the input dtypes, rounded once to ``out_dtype`` (None: x.dtype). Backward
(``dsgraph::gated_rmsnorm_backward``, same backend): dx, dgate, dweight in their inputs' dtypes.

Kernel interface (``KernelImpl`` of op "gated_rmsnorm"): ``forward(x, gate, weight, eps, group_size,
out_dtype)`` -> out; ``backward(x, gate, weight, dout, eps, group_size)`` -> (dx, dgate or None,
dweight); ``unsupported(x, gate, weight, eps, group_size, out_dtype)`` -> reason or None. Backends:
``mamba_ssm`` (mamba-ssm's gated RMSNorm Triton kernels, CUDA only), ``triton`` (ours), ``torch``. The
torch reference (``dsgraph/kernels/gated_norm_ref.py``) serves every valid site and is the oracle.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..registry import KernelImpl, kernel, register_kernel
from .dtensor import reject_dtensor

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_gated_rmsnorm_args(x: Tensor, gate: Optional[Tensor], weight: Tensor, eps: float, group_size: int,
                             out_dtype: Optional[torch.dtype]) -> None:
    """Raise a ValueError naming the argument when the call is outside what every backend accepts."""
    if x.dim() < 1:
        raise ValueError("dsgraph::gated_rmsnorm: x must have at least one dim (the normalised channels)")
    d = x.shape[-1]
    for name, dtype in (("x", x.dtype), ("gate", None if gate is None else gate.dtype), ("weight", weight.dtype),
                        ("out_dtype", out_dtype)):
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dsgraph::gated_rmsnorm: {name} dtype must be one of {', '.join(map(str, DTYPES))}, "
                             f"got {dtype}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"dsgraph::gated_rmsnorm: gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    if tuple(weight.shape) != (d,):
        raise ValueError(f"dsgraph::gated_rmsnorm: weight must have shape [D] = [{d}], got {tuple(weight.shape)}")
    if not isinstance(group_size, int) or group_size < 1 or d % group_size:
        raise ValueError(f"dsgraph::gated_rmsnorm: group_size must be a positive divisor of D = {d}, "
                         f"got {group_size!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"dsgraph::gated_rmsnorm: eps must be a finite number >= 0, got {eps!r}")


@torch.library.custom_op("dsgraph::gated_rmsnorm", mutates_args=())
def gated_rmsnorm(x: Tensor, gate: Optional[Tensor], weight: Tensor, eps: float, group_size: int,
                  out_dtype: Optional[torch.dtype], backend: str) -> Tensor:
    check_gated_rmsnorm_args(x, gate, weight, eps, group_size, out_dtype)
    return kernel("gated_rmsnorm", backend).forward(x, gate, weight, eps, group_size, out_dtype).contiguous()


@gated_rmsnorm.register_fake
def _(x, gate, weight, eps, group_size, out_dtype, backend):
    check_gated_rmsnorm_args(x, gate, weight, eps, group_size, out_dtype)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.custom_op("dsgraph::gated_rmsnorm_backward", mutates_args=())
def gated_rmsnorm_backward(dout: Tensor, x: Tensor, gate: Optional[Tensor], weight: Tensor, eps: float,
                           group_size: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgate, dweight); dgate is an empty tensor when there is no gate (custom ops return tensors)."""
    dx, dgate, dweight = kernel("gated_rmsnorm", backend).backward(x, gate, weight, dout, eps, group_size)
    return dx.contiguous(), (x.new_empty(0) if dgate is None else dgate.contiguous()), dweight.contiguous()


@gated_rmsnorm_backward.register_fake
def _(dout, x, gate, weight, eps, group_size, backend):
    return x.new_empty(x.shape), x.new_empty(0) if gate is None else gate.new_empty(gate.shape), \
        weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, gate, weight, eps, group_size, _out_dtype, backend = inputs
    ctx.save_for_backward(x, gate, weight)
    ctx.params = (eps, group_size, backend)


def _backward(ctx, dout):
    x, gate, weight = ctx.saved_tensors
    dx, dgate, dweight = torch.ops.dsgraph.gated_rmsnorm_backward(dout, x, gate, weight, *ctx.params)
    return dx, (None if gate is None else dgate), dweight, None, None, None, None


gated_rmsnorm.register_autograd(_backward, setup_context=_setup_context)


def _runner(backend: str):
    """Autotune's view of a backend: the op and its backward, as the rewritten graph runs them."""
    def run(x, gate, weight, eps, group_size, out_dtype=None):
        return gated_rmsnorm(x, gate, weight, eps, group_size, out_dtype, backend)
    return run


def _torch_forward(*args):
    from ..kernels.gated_norm_ref import gated_rmsnorm_ref
    return gated_rmsnorm_ref(*args)


def _torch_backward(*args):
    from ..kernels.gated_norm_ref import gated_rmsnorm_ref_backward
    return gated_rmsnorm_ref_backward(*args)


def _triton_forward(*args):
    from ..kernels.gated_norm_triton import gated_rmsnorm_triton
    return gated_rmsnorm_triton(*args)


def _triton_backward(*args):
    from ..kernels.gated_norm_triton import gated_rmsnorm_triton_backward
    return gated_rmsnorm_triton_backward(*args)


def _triton_unsupported(x, gate, weight, eps, group_size, out_dtype=None):
    try:
        from ..kernels.gated_norm_triton import triton_unsupported_reason
    except ImportError as exc:  # triton missing or broken: say so, never fail the compile
        return f"triton not importable ({exc})"
    return triton_unsupported_reason(x, gate, weight, eps, group_size, out_dtype)


def _serves_all(x, gate, weight, eps, group_size, out_dtype=None):
    return None


register_kernel(KernelImpl("gated_rmsnorm", "torch", _torch_forward, _torch_backward, _serves_all,
                           run=_runner("torch")))
register_kernel(KernelImpl("gated_rmsnorm", "triton", _triton_forward, _triton_backward, _triton_unsupported,
                           run=_runner("triton")))


def _mamba_forward(*args):
    from ..kernels.gated_norm_mamba import gated_rmsnorm_mamba
    return gated_rmsnorm_mamba(*args)


def _mamba_backward(*args):
    from ..kernels.gated_norm_mamba import gated_rmsnorm_mamba_backward
    return gated_rmsnorm_mamba_backward(*args)


def _mamba_unsupported(x, gate, weight, eps, group_size, out_dtype=None):
    from ..kernels.gated_norm_mamba import mamba_unsupported_reason
    return mamba_unsupported_reason(x, gate, weight, eps, group_size, out_dtype)


register_kernel(KernelImpl("gated_rmsnorm", "mamba_ssm", _mamba_forward, _mamba_backward, _mamba_unsupported,
                           run=_runner("mamba_ssm")))


reject_dtensor("gated_rmsnorm", "gated_rmsnorm_backward")
