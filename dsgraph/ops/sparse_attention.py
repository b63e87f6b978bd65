"""``dsgraph::sparse_attention``: attention over a per-query list of key indices (DeepSeek Sparse
Attention), gathering only the selected keys: O(S x K) work and memory instead of O(S x T).

``sparse_attention(q [B,S,H,D], k [B,T,Hkv,D], v [B,T,Hkv,d_v]?, indices [B,S,K], bias [B,S,K]?, sink [H]?,
scale, d_v, upper?, backend) -> (out [B,S,H,d_v], lse [B,S,H] fp32)``

- MHA/GQA mode: per-head keys and values (``Hkv`` divides ``H``; query head h reads kv head
  ``h // (H // Hkv)``), the layout of DeepSeek's official prefill code.
- Latent (MQA) mode: ``v`` None, one key per position shared by all heads (``Hkv = 1``), the values its
  first ``d_v`` dims (FlashMLA / TileLang layout): 576 = 512 latent + 64 rope dims with d_v = 512
  (DeepSeek V3.2), or K = V with d_v = D = 512 (DeepSeek V4).
- Entry j of query s is used iff ``0 <= j < T`` and (with ``upper``) ``j - s <= upper``: -1 padding,
  out-of-range entries and causally invalid ones (``upper = T - S`` for the causal band) are skipped.
  Indices are taken as distinct per row (``torch.topk`` indices are; a repeat would count twice).
- ``bias``: an fp32 term added to the scaled score of each (query, index) entry, the same for all
  heads (-inf skips the entry): a mask tensor gathered at the indices (never differentiated).
- ``sink``: per-head logits [H] (any float dtype, used in fp32; DeepSeek V4's attention sink): one more
  softmax column per row that takes probability mass and adds no value.
- ``lse``: natural log-sum-exp of the scaled fp32 scores, the sink column included
  (``log(sum_j exp(s_j) + exp(sink_h))``), so ``exp(s_j - lse)`` are the probabilities. A row with no
  valid entry gets out = 0 (as eager gives with a sink; without one eager softmax would give NaN) and
  lse = sink, or -inf without a sink; no gradient flows through it.
- Backward (``dsgraph::sparse_attention_backward``, same backend): (dq, dk, dv, dsink); dq, dk, dv in
  the inputs' dtypes (latent mode returns the values' gradient inside dk and an empty dv);
  ``dsink[h] = -sum_{b,s} exp(sink_h - lse) * rowsum(dout * out)`` in fp32, computed here from out,
  dout and lse for every backend (an empty tensor without a sink).

Kernel interface (``KernelImpl`` of op "sparse_attention"): ``forward(q, k, v, indices, *, bias, sink,
scale, d_v, upper) -> (out, lse)`` (lse with the sink), ``backward(q, k, v, out, lse, dout, indices, *,
bias, sink, scale, d_v, upper) -> (dq, dk, dv or None)`` (lse includes the sink, so p = exp(s - lse)
needs no sink term), ``unsupported(q, k, v, indices, *, bias, sink, scale, d_v, upper) -> reason or None``.
The torch reference (``dsgraph/kernels/sparse_attention_ref.py``) is the oracle of every backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..registry import KernelImpl, kernel, register_kernel
from .dtensor import reject_dtensor


@torch.library.custom_op("dsgraph::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k: Tensor, v: Optional[Tensor], indices: Tensor, bias: Optional[Tensor],
                     sink: Optional[Tensor], scale: float, d_v: int, upper: Optional[int],
                     backend: str) -> tuple[Tensor, Tensor]:
    from ..kernels.sparse_attention_ref import check_sparse_attention_args
    check_sparse_attention_args(q, k, v, indices, d_v, bias, sink)
    out, lse = kernel("sparse_attention", backend).forward(q, k, v, indices, bias=bias, sink=sink, scale=scale,
                                                           d_v=d_v, upper=upper)
    return out.to(q.dtype).contiguous(), lse.contiguous()


@sparse_attention.register_fake
def _(q, k, v, indices, bias, sink, scale, d_v, upper, backend):
    from ..kernels.sparse_attention_ref import check_sparse_attention_args
    check_sparse_attention_args(q, k, v, indices, d_v, bias, sink)
    batch, seq, heads, _ = q.shape
    return q.new_empty((batch, seq, heads, d_v)), q.new_empty((batch, seq, heads), dtype=torch.float32)


def _dsink(out: Tensor, dout: Tensor, lse: Tensor, sink: Tensor) -> Tensor:
    """d loss / d sink_h = -sum_{b,s} p_sink * rowsum(dout * out): the sink column's dp is 0 (it adds
    no value), so its ds is p_sink * (0 - delta)."""
    # A row with no valid entry has out = 0, so delta = 0; lse = -inf there only with sink -inf (p_sink 0).
    p_sink = torch.exp(sink.float() - lse.where(lse > float("-inf"), float("inf")))
    return -(p_sink * (dout.float() * out.float()).sum(-1)).sum((0, 1))


@torch.library.custom_op("dsgraph::sparse_attention_backward", mutates_args=())
def sparse_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Optional[Tensor], out: Tensor, lse: Tensor,
                              indices: Tensor, bias: Optional[Tensor], sink: Optional[Tensor], scale: float,
                              d_v: int, upper: Optional[int], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dout = dout.contiguous()
    dq, dk, dv = kernel("sparse_attention", backend).backward(
        q, k, v, out, lse, dout, indices, bias=bias, sink=sink, scale=scale, d_v=d_v, upper=upper)
    dv = q.new_empty((0,)) if dv is None else dv.to(v.dtype)
    dsink = q.new_empty((0,), dtype=torch.float32) if sink is None else _dsink(out, dout, lse, sink)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.contiguous(), dsink


@sparse_attention_backward.register_fake
def _(dout, q, k, v, out, lse, indices, bias, sink, scale, d_v, upper, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty((0,)) if v is None else v.new_empty(v.shape),
            q.new_empty((0,) if sink is None else sink.shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, indices, bias, sink, scale, d_v, upper, backend = inputs
    ctx.save_for_backward(q, k, v, indices, bias, sink, *output)
    ctx.params = (scale, d_v, upper, backend)


def _backward(ctx, dout, _dlse):
    q, k, v, indices, bias, sink, out, lse = ctx.saved_tensors
    dq, dk, dv, dsink = torch.ops.dsgraph.sparse_attention_backward(dout, q, k, v, out, lse, indices, bias, sink,
                                                                    *ctx.params)
    return (dq, dk, dv if v is not None else None, None, None, dsink.to(sink.dtype) if sink is not None else None,
            None, None, None, None)


sparse_attention.register_autograd(_backward, setup_context=_setup_context)


def _torch_forward(q, k, v, indices, **kw):
    from ..kernels.sparse_attention_ref import sparse_attention_ref
    return sparse_attention_ref(q, k, v, indices, **kw)


def _torch_backward(q, k, v, out, lse, dout, indices, **kw):
    from ..kernels.sparse_attention_ref import sparse_attention_ref_backward
    return sparse_attention_ref_backward(q, k, v, out, lse, dout, indices, **kw)


def _triton_forward(q, k, v, indices, **kw):
    from ..kernels.sparse_attention_triton import sparse_attention_triton
    return sparse_attention_triton(q, k, v, indices, **kw)


def _triton_backward(q, k, v, out, lse, dout, indices, **kw):
    from ..kernels.sparse_attention_triton import sparse_attention_triton_backward
    return sparse_attention_triton_backward(q, k, v, out, lse, dout, indices, **kw)


def _triton_unsupported(q, k, v, indices, **kw):
    try:
        from ..kernels.sparse_attention_triton import triton_unsupported_reason
    except ImportError as exc:  # triton missing or broken: say so, never fail the compile
        return f"triton not importable ({exc})"
    return triton_unsupported_reason(q, k, v, indices, **kw)


# The TileLang kernels take the latent layout only and indices as [B, S, 1, K] (int64 ones are
# clamped there before narrowing to int32, so positions past int32 still mean "skip").
def _tilelang_indices(indices: Tensor) -> Tensor:
    return indices[:, :, None]


def _tilelang_unsupported(q, k, v, indices, *, bias, sink=None, scale, d_v, upper):
    if bias is not None:
        return "the tilelang kernel takes no bias (a mask reached the compiled graph as a tensor)"
    if v is not None or k.shape[2] != 1:
        return "the tilelang kernel takes the latent (MQA) layout only: one shared key, values = its first d_v dims"
    try:
        from ..kernels.sparse_attention_tilelang import tilelang_unsupported_reason
    except ImportError as exc:
        return f"tilelang sparse attention not importable ({exc})"
    return tilelang_unsupported_reason(q, k, _tilelang_indices(indices), scale=scale, d_v=d_v, upper=upper, sink=sink)


def _tilelang_forward(q, k, v, indices, *, bias, sink, scale, d_v, upper):
    from ..kernels.sparse_attention_tilelang import sparse_mla_fwd_tilelang
    return sparse_mla_fwd_tilelang(q, k, _tilelang_indices(indices), scale=scale, d_v=d_v, upper=upper, sink=sink)


def _tilelang_backward(q, k, v, out, lse, dout, indices, *, bias, sink, scale, d_v, upper):
    from ..kernels.sparse_attention_tilelang import sparse_mla_bwd_tilelang
    dq, dkv = sparse_mla_bwd_tilelang(q, k, out, dout, _tilelang_indices(indices), lse, scale=scale, d_v=d_v,
                                      upper=upper)
    return dq, dkv, None


register_kernel(KernelImpl("sparse_attention", "torch", _torch_forward, _torch_backward,
                           unsupported=lambda q, k, v, indices, **kw: None))
register_kernel(KernelImpl("sparse_attention", "triton", _triton_forward, _triton_backward,
                           unsupported=_triton_unsupported))
register_kernel(KernelImpl("sparse_attention", "tilelang", _tilelang_forward, _tilelang_backward,
                           unsupported=_tilelang_unsupported))


reject_dtensor("sparse_attention", "sparse_attention_backward")
