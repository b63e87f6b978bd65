"""``dsgraph::ssd_scan`` and ``dsgraph::ssd_step``: the Mamba2 state-space scan (SSD) and its one-step
decode update.

``ssd_scan(x [b,L,H,P], dt [b,L,H], A [H], B [b,L,G,N], C [b,L,G,N], D [H]?, z [b,L,H,P]?,
initial_states [b,H,P,N]?, chunk_size, backend) -> (y [b,L,H,P], final_state [b,H,P,N], residual)``::

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_tᵀ      (h_0 = initial_states, else 0; head h reads group h // (H/G))
    y_t = (C_t h_t + D x_t) * silu(z_t)

- ``dt`` is already discretised (softplus, bias and limits applied by the caller, as in the model's
  graph); math in ``promote(x.dtype, float32)``; ``y`` in x's dtype, the final state in the compute
  dtype. ``chunk_size`` is the chunking of the algorithm (it changes rounding only); any L (the tail
  chunk is zero-padded, which leaves the state unchanged).
- ``residual``: y before the z gate (x's dtype) when z is given, else an empty tensor; kept for the
  backward (mamba-ssm's needs it), never used by the rewritten graph.
- Backward (``dsgraph::ssd_scan_backward``, same backend): gradients of every tensor input.

``ssd_step(state [b,H,P,N], x [b,H,P], dt [b,H], A [H], B [b,G,N], C [b,G,N], D?, z?, backend)
-> (y [b,H,P], new state)``: one step of the recurrence above (decode). Forward only.

Kernel interface (``KernelImpl`` of op "ssd_scan" / "ssd_step"): ``forward(x, dt, A, B, C, *, chunk_size,
D, z, initial_states)`` -> (y, final, residual); ``backward(dy, dfinal, y, residual, x, dt, A, B, C, *,
chunk_size, D, z, initial_states)`` -> 8 gradients (None for absent inputs);
``unsupported(x, dt, A, B, C, *, chunk_size, D=None, z=None, initial_states=None, decays_bounded=False)``
-> reason or None; ``decays_bounded``: the caller guarantees exp(dt A) <= 1 (dt >= 0, A <= 0), which
the mamba_ssm backend assumes (its kernels clip decays at 1).
The torch reference (``dsgraph/kernels/ssd_ref.py``) is the oracle of every backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import ssd_mamba, ssd_ref, ssd_triton
from ..registry import KernelImpl, kernel, register_kernel
from .dtensor import reject_dtensor


@torch.library.custom_op("dsgraph::ssd_scan", mutates_args=())
def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             initial_states: Optional[Tensor], chunk_size: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    ssd_ref.check_ssd_args(x, dt, A, B, C, chunk_size, D, z, initial_states)
    y, final, residual = kernel("ssd_scan", backend).forward(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, initial_states=initial_states)
    return y.contiguous(), final.contiguous(), residual.contiguous()


@ssd_scan.register_fake
def _(x, dt, A, B, C, D, z, initial_states, chunk_size, backend):
    ssd_ref.check_ssd_args(x, dt, A, B, C, chunk_size, D, z, initial_states)
    b, _, H, P = x.shape
    final = x.new_empty((b, H, P, B.shape[-1]), dtype=ssd_ref.compute_dtype(x))
    return x.new_empty(x.shape), final, x.new_empty(x.shape if z is not None else (0,))



@torch.library.custom_op("dsgraph::ssd_scan_backward", mutates_args=())
def ssd_scan_backward(dy: Tensor, dfinal: Tensor, y: Tensor, residual: Tensor, x: Tensor, dt: Tensor, A: Tensor,
                      B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                      initial_states: Optional[Tensor], chunk_size: int, backend: str) -> list[Tensor]:
    grads = kernel("ssd_scan", backend).backward(dy, dfinal, y, residual, x, dt, A, B, C, chunk_size=chunk_size,
                                                 D=D, z=z, initial_states=initial_states)
    # An absent input's gradient is an empty tensor (custom ops return tensors only).
    return [x.new_empty(0) if g is None else g.contiguous() for g in grads]


@ssd_scan_backward.register_fake
def _(dy, dfinal, y, residual, x, dt, A, B, C, D, z, initial_states, chunk_size, backend):
    return [x.new_empty(0) if t is None else t.new_empty(t.shape) for t in (x, dt, A, B, C, D, z, initial_states)]


def _scan_setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, h0, chunk_size, backend = inputs
    y, _final, residual = output
    ctx.save_for_backward(y, residual, x, dt, A, B, C, D, z, h0)
    ctx.params = (chunk_size, backend)


def _scan_backward(ctx, dy, dfinal, _dresidual):
    y, residual, x, dt, A, B, C, D, z, h0 = ctx.saved_tensors
    grads = torch.ops.dsgraph.ssd_scan_backward(dy, dfinal, y, residual, x, dt, A, B, C, D, z, h0, *ctx.params)
    present = (x, dt, A, B, C, D, z, h0)
    return (*(g if t is not None else None for g, t in zip(grads, present)), None, None)


ssd_scan.register_autograd(_scan_backward, setup_context=_scan_setup_context)


@torch.library.custom_op("dsgraph::ssd_step", mutates_args=())
def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    _check_step(state, x, dt, A, B, C, D, z)
    y, new = kernel("ssd_step", backend).forward(state, x, dt, A, B, C, D=D, z=z)
    return y.contiguous(), new.contiguous()


@ssd_step.register_fake
def _(state, x, dt, A, B, C, D, z, backend):
    _check_step(state, x, dt, A, B, C, D, z)
    return x.new_empty(x.shape), state.new_empty(state.shape, dtype=ssd_ref.compute_dtype(x))


def _check_step(state, x, dt, A, B, C, D, z):
    """The decode step is the scan of one position: reuse its checks on length-1 views."""
    if x.dim() != 3:
        raise ValueError(f"ssd_step: x must be [B, H, P]; got shape {tuple(x.shape)}")
    if B.dim() != 3:
        raise ValueError(f"ssd_step: B must be [B, G, N]; got shape {tuple(B.shape)}")
    ssd_ref.check_ssd_args(x[:, None], dt[:, None], A, B[:, None], C[:, None], 1, D,
                           None if z is None else z[:, None], state)


def _serves_all(*args, **kw):
    return None


def _torch_scan(x, dt, A, B, C, *, chunk_size, D, z, initial_states):
    return ssd_ref.ssd_scan_ref(x, dt, A, B, C, chunk_size, D, z, initial_states)


def _torch_scan_backward(dy, dfinal, y, residual, x, dt, A, B, C, *, chunk_size, D, z, initial_states):
    return ssd_ref.ssd_scan_ref_backward(dy, dfinal, x, dt, A, B, C, chunk_size, D, z, initial_states)


register_kernel(KernelImpl("ssd_scan", "torch", _torch_scan, _torch_scan_backward, _serves_all))
register_kernel(KernelImpl("ssd_scan", "mamba_ssm", ssd_mamba.scan_forward, ssd_mamba.scan_backward,
                           ssd_mamba.scan_unsupported))
register_kernel(KernelImpl("ssd_step", "torch", ssd_ref.ssd_step_ref, None, _serves_all))
register_kernel(KernelImpl("ssd_step", "mamba_ssm", ssd_mamba.step_forward, None, ssd_mamba.step_unsupported))
register_kernel(KernelImpl("ssd_step", "triton", ssd_triton.step_forward, None, ssd_triton.step_unsupported))

reject_dtensor("ssd_scan", "ssd_scan_backward", "ssd_step")
