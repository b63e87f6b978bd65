"""``dsgraph::window_pool``: DeepSeek V4's Compressor pooling, a softmax-weighted sum over windows of tokens.

``window_pool(kv [B, N, w], score [B, N, w], ape [r, w] or None, ratio r, overlap, out_dtype, backend)
-> pooled [B, P, d]`` with P = N // r (an incomplete trailing window is not pooled)::

    k = kv[:, :P r].unflatten(1, (P, r))                              [B, P, r, w]
    s = score[:, :P r].unflatten(1, (P, r)) + ape                     (ape broadcast over B and P)
    plain (d = w):       pooled = sum_j k[:, :, j] * softmax_j(s)[:, :, j]
    overlap (d = w / 2): window n pools 2r slots: slots r.. are its own tokens' second feature half
                         k[:, n, :, d:], slots ..r the previous window's first half k[:, n - 1, :, :d];
                         window 0 has no previous window: those slots are kv 0 / score -inf (weight 0)

The softmax is per feature column over the window's slots (``softmax(dim=2)`` of [B, P, slots, d]),
as ``models/deepseek_v4.py`` (``DeepseekV4Compressor.forward``, ``overlap_transform``) writes it.
Eager's numerics are kept where they show: a column whose slots are all -inf (or hold +inf or NaN)
is NaN, as eager's softmax makes it; window 0's -inf fill never makes a column all -inf (its own r
slots are there), so it never yields NaN. The math is fp32 (fp64 for fp64 inputs) whatever the input
dtypes; the result is rounded once to ``out_dtype`` (None: ``promote_types(kv, score, ape)``, eager's).

Backward (``dsgraph::window_pool_backward``, same backend): dkv, dscore, dape in their inputs' dtypes
(dape fp32 [r, w] when ape is None; autograd drops it). Nothing is saved but the inputs: the kernels
recompute each window's softmax, which is cheaper than storing it (it is as large as the inputs).
Tokens past P·r, and in overlap mode the last window's first feature half (no window reads them),
get zero gradients.

Kernel interface (``KernelImpl`` of op "window_pool"): ``forward(kv, score, ape, ratio, overlap,
out_dtype)``; ``backward(kv, score, ape, grad, ratio, overlap)`` -> (dkv, dscore, dape);
``unsupported(kv, score, ape, ratio, overlap, out_dtype)`` -> reason or None. Backends: ``tilelang``
(Hopper), ``triton``, ``torch`` (the reference: serves every valid call and is the oracle).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..registry import KernelImpl, kernel, register_kernel
from .dtensor import reject_dtensor

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def result_dtype(kv: Tensor, score: Tensor, ape: Optional[Tensor]) -> torch.dtype:
    """Eager's dtype of ``(kv * (score + ape).softmax()).sum()``."""
    dtype = torch.promote_types(kv.dtype, score.dtype)
    return dtype if ape is None else torch.promote_types(dtype, ape.dtype)


def compute_dtype(kv: Tensor, score: Tensor, ape: Optional[Tensor]) -> torch.dtype:
    return torch.promote_types(result_dtype(kv, score, ape), torch.float32)


def pooled_shape(kv: Tensor, ratio: int, overlap: bool) -> tuple[int, int, int]:
    B, N, w = kv.shape
    return B, N // ratio, w // 2 if overlap else w


def check_window_pool_args(kv: Tensor, score: Tensor, ape: Optional[Tensor], ratio: int, overlap: bool,
                           out_dtype: Optional[torch.dtype] = None) -> None:
    """Raise a ValueError naming the argument when the call is outside what every backend accepts."""
    name = "dsgraph::window_pool"
    if kv.dim() != 3:
        raise ValueError(f"{name}: kv must be [B, N, w], got shape {tuple(kv.shape)}")
    if score.shape != kv.shape:
        raise ValueError(f"{name}: score must have kv's shape {tuple(kv.shape)}, got {tuple(score.shape)}")
    for arg, dtype in (("kv", kv.dtype), ("score", score.dtype), ("ape", None if ape is None else ape.dtype),
                       ("out_dtype", out_dtype)):
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"{name}: {arg} dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype}")
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"{name}: ratio must be an integer >= 1, got {ratio!r}")
    if not isinstance(overlap, bool):
        raise ValueError(f"{name}: overlap must be True or False, got {overlap!r}")
    if overlap and kv.shape[-1] % 2:
        raise ValueError(f"{name}: overlap mode splits the features in halves: w must be even, got {kv.shape[-1]}")
    if ape is not None and tuple(ape.shape) != (ratio, kv.shape[-1]):
        raise ValueError(f"{name}: ape must be [ratio, w] = [{ratio}, {kv.shape[-1]}], got {tuple(ape.shape)}")
    devices = {t.device for t in (kv, score, ape) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: kv, score and ape must be on one device, got {sorted(map(str, devices))}")


@torch.library.custom_op("dsgraph::window_pool", mutates_args=())
def window_pool(kv: Tensor, score: Tensor, ape: Optional[Tensor], ratio: int, overlap: bool,
                out_dtype: Optional[torch.dtype], backend: str) -> Tensor:
    check_window_pool_args(kv, score, ape, ratio, overlap, out_dtype)
    dtype = out_dtype or result_dtype(kv, score, ape)
    if pooled_shape(kv, ratio, overlap)[1] == 0 or kv.numel() == 0:
        return kv.new_empty(pooled_shape(kv, ratio, overlap), dtype=dtype)
    return kernel("window_pool", backend).forward(kv, score, ape, ratio, overlap, dtype).contiguous()


@window_pool.register_fake
def _(kv, score, ape, ratio, overlap, out_dtype, backend):
    check_window_pool_args(kv, score, ape, ratio, overlap, out_dtype)
    return kv.new_empty(pooled_shape(kv, ratio, overlap), dtype=out_dtype or result_dtype(kv, score, ape))


def _grad_like(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


@torch.library.custom_op("dsgraph::window_pool_backward", mutates_args=())
def window_pool_backward(grad: Tensor, kv: Tensor, score: Tensor, ape: Optional[Tensor], ratio: int, overlap: bool,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    check_window_pool_args(kv, score, ape, ratio, overlap)
    if tuple(grad.shape) != pooled_shape(kv, ratio, overlap):
        raise ValueError(f"dsgraph::window_pool_backward: grad must be [B, P, d] = "
                         f"{list(pooled_shape(kv, ratio, overlap))}, got {tuple(grad.shape)}")
    if grad.numel() == 0:
        dape = torch.zeros((ratio, kv.shape[-1]), dtype=torch.float32 if ape is None else ape.dtype, device=kv.device)
        return torch.zeros_like(kv, memory_format=torch.contiguous_format), \
            torch.zeros_like(score, memory_format=torch.contiguous_format), dape
    dkv, dscore, dape = kernel("window_pool", backend).backward(kv, score, ape, grad, ratio, overlap)
    return dkv.contiguous(), dscore.contiguous(), dape.contiguous()


@window_pool_backward.register_fake
def _(grad, kv, score, ape, ratio, overlap, backend):
    dape = torch.empty((ratio, kv.shape[-1]), dtype=torch.float32 if ape is None else ape.dtype, device=kv.device)
    return _grad_like(kv), _grad_like(score), dape


def _setup_context(ctx, inputs, output):
    kv, score, ape, ratio, overlap, _, backend = inputs
    ctx.save_for_backward(kv, score, ape)
    ctx.params = (ratio, overlap, backend)


def _backward(ctx, grad):
    kv, score, ape = ctx.saved_tensors
    dkv, dscore, dape = torch.ops.dsgraph.window_pool_backward(grad, kv, score, ape, *ctx.params)
    return dkv, dscore, (dape if ape is not None else None), None, None, None, None


window_pool.register_autograd(_backward, setup_context=_setup_context)


def _torch_forward(*args):
    from ..kernels.window_pool_ref import window_pool_ref
    return window_pool_ref(*args)


def _torch_backward(*args):
    from ..kernels.window_pool_ref import window_pool_ref_backward
    return window_pool_ref_backward(*args)


def _triton_forward(*args):
    from ..kernels.window_pool_triton import window_pool_triton
    return window_pool_triton(*args)


def _triton_backward(*args):
    from ..kernels.window_pool_triton import window_pool_triton_backward
    return window_pool_triton_backward(*args)


def _triton_unsupported(kv, score, ape, ratio, overlap, out_dtype=None):
    try:
        from ..kernels.window_pool_triton import triton_unsupported_reason
    except ImportError as exc:  # triton missing or broken: say so, never fail the compile
        return f"triton not importable ({exc})"
    return triton_unsupported_reason(kv, score, ape, ratio, overlap)


def _tilelang_forward(*args):
    from ..kernels.window_pool_tilelang import window_pool_tilelang
    return window_pool_tilelang(*args)


def _tilelang_backward(*args):
    from ..kernels.window_pool_tilelang import window_pool_tilelang_backward
    return window_pool_tilelang_backward(*args)


def _tilelang_unsupported(kv, score, ape, ratio, overlap, out_dtype=None):
    from ..kernels.window_pool_tilelang import tilelang_unsupported_reason  # imports tilelang lazily
    return tilelang_unsupported_reason(kv, score, ape, ratio, overlap)


def _serves_all(kv, score, ape, ratio, overlap, out_dtype=None):
    return None


def _runner(backend: str):
    """Autotune's view of a backend: the op and its backward, as the rewritten graph runs them."""
    def run(kv, score, ape, ratio, overlap, out_dtype=None):
        return window_pool(kv, score, ape, ratio, overlap, out_dtype, backend)
    return run


register_kernel(KernelImpl("window_pool", "torch", _torch_forward, _torch_backward, _serves_all, run=_runner("torch")))
register_kernel(KernelImpl("window_pool", "triton", _triton_forward, _triton_backward, _triton_unsupported,
                           run=_runner("triton")))
register_kernel(KernelImpl("window_pool", "tilelang", _tilelang_forward, _tilelang_backward, _tilelang_unsupported,
                           run=_runner("tilelang")))


reject_dtensor("window_pool", "window_pool_backward")
