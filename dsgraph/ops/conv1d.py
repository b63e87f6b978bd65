"""``dsgraph::causal_conv1d``: causal depthwise 1-D convolution over the sequence, optional SiLU.

``causal_conv1d(x [B, L, C], weight [C, K], bias [C] or None, activation, backend) -> [B, L, C]``::

    pre[b, t, c] = bias[c] + Σ_{k<K} weight[c, k] · x[b, t - (K - 1) + k, c]     (x = 0 before t = 0)
    out = silu(pre) if activation == "silu" else pre

Channels-last (the Mamba2 layout: the xBC slice of in_proj's output), any strides. The math is
fp32 (fp64 for fp64 inputs), rounded once to x.dtype. Backward (``dsgraph::causal_conv1d_backward``,
same backend): dx, dweight, dbias in their inputs' dtypes, the pre-activation recomputed.

Kernel interface (``KernelImpl`` of op "causal_conv1d"): ``forward(x, weight, bias, activation)``;
``backward(x, weight, bias, activation, dout)`` -> (dx, dweight, dbias or None);
``unsupported(x, weight, bias, activation)`` -> reason or None. The torch reference
(``dsgraph/kernels/conv1d_ref.py``) serves every valid site and is the oracle.

``dsgraph::causal_conv1d_update`` (decode, forward only): the conv continued from a conv state, which
it shifts. ``causal_conv1d_update(x [B, L, C], conv_state [B, C, K - 1], weight [C, K], bias [C] or
None, activation, backend) -> (out [B, L, C], new_state [B, C, K - 1])``, both in x.dtype::

    window = cat([conv_state.to(x.dtype), x.transpose(1, 2)], -1)           # [B, C, K - 1 + L]
    out[b, t, c] = act(bias[c] + Σ_{k<K} weight[c, k] · window[b, c, t + k])
    new_state = window[..., L:]

the state rounded to x.dtype first (Mamba2's ``cache.conv.to(xBC.dtype)``), the math then as above.
Kernel interface (op "causal_conv1d_update"): ``forward(x, conv_state, weight, bias, activation)`` ->
(out, new_state); ``unsupported(x, conv_state, weight, bias, activation)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..registry import KernelImpl, kernel, register_kernel
from .dtensor import reject_dtensor

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACTIVATIONS = (None, "silu")


def check_causal_conv1d_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> None:
    """Raise a ValueError naming the argument when the call is outside what every backend accepts."""
    if x.dim() != 3:
        raise ValueError(f"dsgraph::causal_conv1d: x must be [B, L, C], got shape {tuple(x.shape)}")
    channels = x.shape[2]
    if weight.dim() != 2 or weight.shape[0] != channels or weight.shape[1] < 1:
        raise ValueError(f"dsgraph::causal_conv1d: weight must be [C, K] = [{channels}, K >= 1], "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"dsgraph::causal_conv1d: bias must be None or [C] = [{channels}], got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in DTYPES:
            raise ValueError(f"dsgraph::causal_conv1d: {name} dtype must be one of {', '.join(map(str, DTYPES))}, "
                             f"got {t.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"dsgraph::causal_conv1d: activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_causal_conv1d_update_args(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                                    activation: Optional[str]) -> None:
    check_causal_conv1d_args(x, weight, bias, activation)
    if x.shape[1] < 1:
        raise ValueError(f"dsgraph::causal_conv1d_update: x must be [B, L >= 1, C], got shape {tuple(x.shape)}")
    want = (x.shape[0], x.shape[2], weight.shape[1] - 1)
    if tuple(conv_state.shape) != want:
        raise ValueError(f"dsgraph::causal_conv1d_update: conv_state must be [B, C, K - 1] = {list(want)}, "
                         f"got {tuple(conv_state.shape)}")
    if conv_state.dtype not in DTYPES:
        raise ValueError(f"dsgraph::causal_conv1d_update: conv_state dtype must be one of "
                         f"{', '.join(map(str, DTYPES))}, got {conv_state.dtype}")


@torch.library.custom_op("dsgraph::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
                  backend: str) -> Tensor:
    check_causal_conv1d_args(x, weight, bias, activation)
    return kernel("causal_conv1d", backend).forward(x, weight, bias, activation).contiguous()


@causal_conv1d.register_fake
def _(x, weight, bias, activation, backend):
    check_causal_conv1d_args(x, weight, bias, activation)
    return x.new_empty(x.shape)


@torch.library.custom_op("dsgraph::causal_conv1d_backward", mutates_args=())
def causal_conv1d_backward(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                           activation: Optional[str], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dbias is an empty tensor when there is no bias (custom ops return tensors)."""
    dx, dweight, dbias = kernel("causal_conv1d", backend).backward(x, weight, bias, activation, dout)
    return dx.contiguous(), dweight.contiguous(), x.new_empty(0) if dbias is None else dbias.contiguous()


@causal_conv1d_backward.register_fake
def _(dout, x, weight, bias, activation, backend):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), \
        x.new_empty(0) if bias is None else bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.params = (activation, backend)


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.dsgraph.causal_conv1d_backward(dout, x, weight, bias, *ctx.params)
    return dx, dweight, None if bias is None else dbias, None, None


causal_conv1d.register_autograd(_backward, setup_context=_setup_context)


def _runner(backend: str):
    """Autotune's view of a backend: the op and its backward, as the rewritten graph runs them."""
    def run(x, weight, bias=None, activation=None):
        return causal_conv1d(x, weight, bias, activation, backend)
    return run


def _torch_forward(*args):
    from ..kernels.conv1d_ref import causal_conv1d_ref
    return causal_conv1d_ref(*args)


def _torch_backward(*args):
    from ..kernels.conv1d_ref import causal_conv1d_ref_backward
    return causal_conv1d_ref_backward(*args)


def _triton_forward(*args):
    from ..kernels.conv1d_triton import causal_conv1d_triton
    return causal_conv1d_triton(*args)


def _triton_backward(*args):
    from ..kernels.conv1d_triton import causal_conv1d_triton_backward
    return causal_conv1d_triton_backward(*args)


def _triton_unsupported(x, weight, bias=None, activation=None):
    try:
        from ..kernels.conv1d_triton import triton_unsupported_reason
    except ImportError as exc:  # triton missing or broken: say so, never fail the compile
        return f"triton not importable ({exc})"
    return triton_unsupported_reason(x, weight, bias, activation)


def _serves_all(*args, **kwargs):
    return None


@torch.library.custom_op("dsgraph::causal_conv1d_update", mutates_args=())
def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                         activation: Optional[str], backend: str) -> tuple[Tensor, Tensor]:
    check_causal_conv1d_update_args(x, conv_state, weight, bias, activation)
    out, new_state = kernel("causal_conv1d_update", backend).forward(x, conv_state, weight, bias, activation)
    return out.contiguous(), new_state.contiguous()


@causal_conv1d_update.register_fake
def _(x, conv_state, weight, bias, activation, backend):
    check_causal_conv1d_update_args(x, conv_state, weight, bias, activation)
    return x.new_empty(x.shape), x.new_empty(conv_state.shape)


def _update_runner(backend: str):
    def run(x, conv_state, weight, bias=None, activation=None):
        return causal_conv1d_update(x, conv_state, weight, bias, activation, backend)
    return run


def _torch_update(*args):
    from ..kernels.conv1d_ref import causal_conv1d_update_ref
    return causal_conv1d_update_ref(*args)


def _triton_update(*args):
    from ..kernels.conv1d_triton import causal_conv1d_update_triton
    return causal_conv1d_update_triton(*args)


def _triton_update_unsupported(x, conv_state, weight, bias=None, activation=None):
    try:
        from ..kernels.conv1d_triton import update_unsupported_reason
    except ImportError as exc:
        return f"triton not importable ({exc})"
    return update_unsupported_reason(x, conv_state, weight, bias, activation)


register_kernel(KernelImpl("causal_conv1d", "torch", _torch_forward, _torch_backward, _serves_all,
                           run=_runner("torch")))
register_kernel(KernelImpl("causal_conv1d", "triton", _triton_forward, _triton_backward, _triton_unsupported,
                           run=_runner("triton")))
register_kernel(KernelImpl("causal_conv1d_update", "torch", _torch_update, None, _serves_all,
                           run=_update_runner("torch")))
register_kernel(KernelImpl("causal_conv1d_update", "triton", _triton_update, None, _triton_update_unsupported,
                           run=_update_runner("triton")))


reject_dtensor("causal_conv1d", "causal_conv1d_backward", "causal_conv1d_update")
