"""``dsgraph::attention``: fused attention over [B, H, S, D] with a symbolic mask.

``attention(q [B,Hq,S,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv], sink [Hq]?, bias?, topk [B,S,K]?, scale,
lower?, upper?, backend) -> (out [B,Hq,S,Dv], lse [B,Hq,S] fp32)``

Position (i, j) is allowed iff ``lower <= j - i <= upper`` (None: unbounded) and, with ``topk``,
j is one of the query's indices; ``bias`` (broadcastable to [B, Hq, S, T], never differentiated) is
added to the scaled fp32 scores; ``sink`` is an extra per-head softmax column with a zero value slot.
``backend`` is fixed at compile time by the policy; the backward op runs the same backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..registry import KernelImpl, kernel, register_kernel
from .dtensor import reject_dtensor

# Backends whose forward does not produce the log-sum-exp (their backward recomputes instead).
_NO_LSE = {"sdpa", "flex"}


@torch.library.custom_op("dsgraph::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, sink: Optional[Tensor], bias: Optional[Tensor],
              topk: Optional[Tensor], scale: float, lower: Optional[int], upper: Optional[int],
              backend: str) -> tuple[Tensor, Tensor]:
    out, lse = kernel("attention", backend).forward(
        q, k, v, scale=scale, sink=sink, bias=bias, lower=lower, upper=upper, topk=topk)
    return out.contiguous(), lse.contiguous()


@attention.register_fake
def _(q, k, v, sink, bias, topk, scale, lower, upper, backend):
    batch, heads, seq, _ = q.shape
    lse_shape = (0,) if backend in _NO_LSE else (batch, heads, seq)
    return q.new_empty((batch, heads, seq, v.shape[-1])), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("dsgraph::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       sink: Optional[Tensor], bias: Optional[Tensor], topk: Optional[Tensor],
                       scale: float, lower: Optional[int], upper: Optional[int],
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dsink = kernel("attention", backend).backward(
        q, k, v, out, lse, dout, scale=scale, sink=sink, bias=bias, lower=lower, upper=upper, topk=topk)
    if dsink is None:
        dsink = q.new_empty((0,), dtype=torch.float32)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsink.contiguous()


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, sink, bias, topk, scale, lower, upper, backend):
    dsink = q.new_empty((0,), dtype=torch.float32) if sink is None else sink.new_empty(sink.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsink


def _setup_context(ctx, inputs, output):
    q, k, v, sink, bias, topk, scale, lower, upper, backend = inputs
    ctx.save_for_backward(q, k, v, sink, bias, topk, *output)
    ctx.params = (scale, lower, upper, backend)


def _backward(ctx, dout, _dlse):
    q, k, v, sink, bias, topk, out, lse = ctx.saved_tensors
    dq, dk, dv, dsink = torch.ops.dsgraph.attention_backward(
        dout, q, k, v, out, lse, sink, bias, topk, *ctx.params)
    return dq, dk, dv, (dsink if sink is not None else None), None, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


def _torch_forward(q, k, v, **kw):
    from ..kernels.attention_ref import attention_ref
    return attention_ref(q, k, v, **kw)


def _torch_backward(q, k, v, out, lse, dout, **kw):
    from ..kernels.attention_ref import attention_ref_backward
    return attention_ref_backward(q, k, v, out, lse, dout, **kw)


def _triton_forward(q, k, v, *, topk, **kw):
    from ..kernels.attention_triton import attention_triton
    return attention_triton(q, k, v, **kw)


def _triton_backward(q, k, v, out, lse, dout, *, topk, **kw):
    from ..kernels.attention_triton import attention_triton_backward
    return attention_triton_backward(q, k, v, out, lse, dout, **kw)


def _triton_unsupported(q, k, v, **kw):
    try:
        from ..kernels.attention_triton import triton_unsupported_reason
    except ImportError as exc:  # triton missing or broken: say so, never fail the compile
        return f"triton not importable ({exc})"
    return triton_unsupported_reason(q, k, v, **kw)


def _tilelang_forward(q, k, v, **kw):
    from ..kernels.attention_tilelang import attention_tilelang
    return attention_tilelang(q, k, v, **kw)


def _tilelang_backward(q, k, v, out, lse, dout, **kw):
    from ..kernels.attention_tilelang import attention_tilelang_backward
    return attention_tilelang_backward(q, k, v, out, lse, dout, **kw)


def _tilelang_unsupported(q, k, v, **kw):
    from ..kernels.attention_tilelang import tilelang_unsupported_reason
    return tilelang_unsupported_reason(q, k, v, **kw)


def _sdpa_unsupported(q, k, v, **kw):
    from ..kernels.attention_sdpa import sdpa_unsupported_reason
    return sdpa_unsupported_reason(q, k, v, **kw)


def _sdpa_forward(q, k, v, **kw):
    from ..kernels.attention_sdpa import attention_sdpa
    return attention_sdpa(q, k, v, **kw)


def _sdpa_backward(q, k, v, out, lse, dout, **kw):
    from ..kernels.attention_sdpa import attention_sdpa_backward
    return attention_sdpa_backward(q, k, v, dout, **kw)


def _flex_unsupported(q, k, v, **kw):
    from ..kernels.attention_flex import flex_unsupported_reason
    return flex_unsupported_reason(q, k, v, **kw)


def _flex_forward(q, k, v, **kw):
    from ..kernels.attention_flex import attention_flex_op
    return attention_flex_op(q, k, v, **kw)


def _flex_backward(q, k, v, out, lse, dout, **kw):
    from ..kernels.attention_flex import attention_flex_op_backward
    return attention_flex_op_backward(q, k, v, dout, **kw)


def _custom_op_runner(backend):
    """Autotune's view of a backend served through ``dsgraph::attention``: the op and its backward."""
    def run(q, k, v, *, scale, sink=None, bias=None, topk=None, lower=None, upper=None):
        bias = None if bias is None else bias.detach()  # never differentiated
        return attention(q, k, v, sink, bias, topk, scale, lower, upper, backend)[0]
    return run


def _sdpa_run(q, k, v, *, bias=None, **kw):
    from ..kernels.attention_sdpa import attention_sdpa
    return attention_sdpa(q, k, v, bias=None if bias is None else bias.detach(), **kw)[0]


def _flex_run(q, k, v, *, scale, sink=None, lower=None, upper=None, **_):
    from ..kernels.attention_flex import attention_flex
    return attention_flex(q, k, v, sink, scale, lower, upper)


register_kernel(KernelImpl("attention", "torch", _torch_forward, _torch_backward,
                           unsupported=lambda q, k, v, **kw: None, run=_custom_op_runner("torch")))
register_kernel(KernelImpl("attention", "triton", _triton_forward, _triton_backward,
                           unsupported=_triton_unsupported, run=_custom_op_runner("triton")))
register_kernel(KernelImpl("attention", "tilelang", _tilelang_forward, _tilelang_backward,
                           unsupported=_tilelang_unsupported, run=_custom_op_runner("tilelang")))
# sdpa and flex: the attention pass emits PyTorch's own ops into the graph (Inductor lowers them,
# forward and backward); the kernels here serve direct calls of the custom op.
register_kernel(KernelImpl("attention", "sdpa", _sdpa_forward, _sdpa_backward,
                           unsupported=_sdpa_unsupported, run=_sdpa_run))
register_kernel(KernelImpl("attention", "flex", _flex_forward, _flex_backward, unsupported=_flex_unsupported,
                           run=_flex_run))


reject_dtensor("attention", "attention_backward")
