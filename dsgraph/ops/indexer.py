"""``dsgraph::indexer_scores`` and ``dsgraph::indexer_topk``: the Lightning Indexer (DeepSeek V3.2
sparse attention) scores and their top-k, without the [B, S, H, T] per-head logits.

``indexer_scores(q [B,S,H,D], k [B,T,D], weights [B,S,H], bias?, lower?, upper?, backend)
-> scores [B,S,T] fp32``::

    scores[b,s,t] = sum_h weights[b,s,h] * relu(q[b,s,h] . k[b,t]) + bias[b,s,t]
                    and -inf where not (lower <= t - s <= upper)

- The dot products and the head sum run in fp32 (q and k may be fp16/bf16/fp32, each cast to fp32
  first, as eager ``q.float()``/``k.float()``); ``weights`` is any float dtype, read as fp32.
- ``bias``: additive, broadcastable to [B, S, T] (compact: e.g. padding [B, 1, T]), never
  differentiated. The band is the convention of ``dsgraph::attention``/``dsgraph::band_mask``
  (t - s, queries and keys numbered from 0; None = unbounded); positions outside it are -inf
  whatever the bias.
- Backward (``dsgraph::indexer_scores_backward``, same backend): dq, dk, dweights in the inputs'
  dtypes, recomputing q . k tile by tile. Positions outside the band get zero gradient: the output
  there is the constant -inf (eager ``scores + band_mask`` passes a cotangent through to them, but
  any finite loss of the scores, e.g. the KL loss, has zero cotangent there). relu'(0) = 0 as in
  torch.

``indexer_topk(q, k, weights, bias?, lower?, upper?, topk, backend) -> (values [B,S,K] fp32,
indices [B,S,K] int64)``: ``torch.topk(indexer_scores(...), topk, dim=-1)`` (largest, sorted
descending), never holding [B, S, H, T] nor the full [B, S, T]. ``0 <= topk <= T`` (ValueError
otherwise). No gradient: both outputs are non-differentiable (a site whose top-k values need
gradients uses ``indexer_scores`` + ``torch.topk`` instead). Ties: where the scores are distinct
the selected set and order equal torch.topk's; among equal scores (typically several -inf
positions of early queries under a causal band when K exceeds the allowed keys) the indices chosen
may differ from torch.topk's — the values are the same, and downstream masks make those positions
-inf anyway.

Kernel interface (``KernelImpl`` of op "indexer_scores" / "indexer_topk" in dsgraph/registry.py):
``forward(q, k, weights, *, bias, lower, upper)`` -> scores;
``backward(q, k, weights, dscores, *, lower, upper)`` -> (dq, dk, dweights);
``forward(q, k, weights, *, bias, lower, upper, topk)`` -> (values, indices) for "indexer_topk";
``unsupported(q, k, weights, *, bias=None, lower=None, upper=None, topk=None)`` -> reason or None.
The torch reference (``dsgraph/kernels/indexer_ref.py``) is the oracle of every backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..registry import KernelImpl, kernel, register_kernel
from .dtensor import reject_dtensor


@torch.library.custom_op("dsgraph::indexer_scores", mutates_args=())
def indexer_scores(q: Tensor, k: Tensor, weights: Tensor, bias: Optional[Tensor], lower: Optional[int],
                   upper: Optional[int], backend: str) -> Tensor:
    return kernel("indexer_scores", backend).forward(q, k, weights, bias=bias, lower=lower, upper=upper).contiguous()


@indexer_scores.register_fake
def _(q, k, weights, bias, lower, upper, backend):
    return q.new_empty((q.shape[0], q.shape[1], k.shape[1]), dtype=torch.float32)


@torch.library.custom_op("dsgraph::indexer_scores_backward", mutates_args=())
def indexer_scores_backward(dscores: Tensor, q: Tensor, k: Tensor, weights: Tensor, lower: Optional[int],
                            upper: Optional[int], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dweights = kernel("indexer_scores", backend).backward(q, k, weights, dscores, lower=lower, upper=upper)
    return dq.contiguous(), dk.contiguous(), dweights.contiguous()


@indexer_scores_backward.register_fake
def _(dscores, q, k, weights, lower, upper, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), weights.new_empty(weights.shape)


def _scores_setup_context(ctx, inputs, output):
    q, k, weights, _bias, lower, upper, backend = inputs
    ctx.save_for_backward(q, k, weights)
    ctx.params = (lower, upper, backend)


def _scores_backward(ctx, dscores):
    q, k, weights = ctx.saved_tensors
    dq, dk, dweights = torch.ops.dsgraph.indexer_scores_backward(dscores, q, k, weights, *ctx.params)
    return dq, dk, dweights, None, None, None, None


indexer_scores.register_autograd(_scores_backward, setup_context=_scores_setup_context)


@torch.library.custom_op("dsgraph::indexer_topk", mutates_args=())
def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, bias: Optional[Tensor], lower: Optional[int],
                 upper: Optional[int], topk: int, backend: str) -> tuple[Tensor, Tensor]:
    values, indices = kernel("indexer_topk", backend).forward(
        q, k, weights, bias=bias, lower=lower, upper=upper, topk=topk)
    return values.contiguous(), indices.contiguous()


@indexer_topk.register_fake
def _(q, k, weights, bias, lower, upper, topk, backend):
    if not 0 <= topk <= k.shape[1]:
        raise ValueError(f"indexer_topk: topk must be in [0, T] = [0, {k.shape[1]}]; got {topk}")
    shape = (q.shape[0], q.shape[1], topk)
    return q.new_empty(shape, dtype=torch.float32), q.new_empty(shape, dtype=torch.int64)


def _topk_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _topk_backward(ctx, _dvalues, _dindices):
    return None, None, None, None, None, None, None, None


# Registered so that inputs requiring grad (the indexer's weights in training) are allowed; the
# outputs are marked non-differentiable, so no gradient ever reaches this.
indexer_topk.register_autograd(_topk_backward, setup_context=_topk_setup_context)


def _torch_scores(q, k, weights, **kw):
    from ..kernels.indexer_ref import indexer_scores_ref
    return indexer_scores_ref(q, k, weights, **kw)


def _torch_scores_backward(q, k, weights, dscores, **kw):
    from ..kernels.indexer_ref import indexer_scores_ref_backward
    return indexer_scores_ref_backward(q, k, weights, dscores, **kw)


def _torch_topk(q, k, weights, **kw):
    from ..kernels.indexer_ref import indexer_topk_ref
    return indexer_topk_ref(q, k, weights, **kw)


def _triton_scores(q, k, weights, **kw):
    from ..kernels.indexer_triton import indexer_scores_triton
    return indexer_scores_triton(q, k, weights, **kw)


def _triton_scores_backward(q, k, weights, dscores, **kw):
    from ..kernels.indexer_triton import indexer_scores_triton_backward
    return indexer_scores_triton_backward(q, k, weights, dscores, **kw)


def _triton_topk(q, k, weights, **kw):
    from ..kernels.indexer_triton import indexer_topk_triton
    return indexer_topk_triton(q, k, weights, **kw)


def _triton_unsupported(q, k, weights, **kw):
    try:
        from ..kernels.indexer_triton import triton_unsupported_reason
    except ImportError as exc:  # triton missing or broken: say so, never fail the compile
        return f"triton not importable ({exc})"
    return triton_unsupported_reason(q, k, weights, **kw)


def _serves_all(q, k, weights, **kw):
    return None


register_kernel(KernelImpl("indexer_scores", "torch", _torch_scores, _torch_scores_backward, _serves_all))
register_kernel(KernelImpl("indexer_topk", "torch", _torch_topk, None, _serves_all))
register_kernel(KernelImpl("indexer_scores", "triton", _triton_scores, _triton_scores_backward, _triton_unsupported))
register_kernel(KernelImpl("indexer_topk", "triton", _triton_topk, None, _triton_unsupported))


def _tilelang_scores(q, k, weights, **kw):
    from ..kernels.indexer_tilelang import indexer_scores_tilelang
    return indexer_scores_tilelang(q, k, weights, **kw)


def _tilelang_topk(q, k, weights, **kw):
    from ..kernels.indexer_tilelang import indexer_topk_tilelang
    return indexer_topk_tilelang(q, k, weights, **kw)


def _tilelang_unsupported(q, k, weights, **kw):
    from ..kernels.indexer_tilelang import tilelang_unsupported_reason  # imports tilelang lazily
    return tilelang_unsupported_reason(q, k, weights, **kw)


# No TileLang backward: the scores' backward runs the Triton kernel, which serves every site the
# TileLang forward does (sm_90, fp16/bf16, D 64 or 128).
register_kernel(KernelImpl("indexer_scores", "tilelang", _tilelang_scores, _triton_scores_backward,
                           _tilelang_unsupported))
register_kernel(KernelImpl("indexer_topk", "tilelang", _tilelang_topk, None, _tilelang_unsupported))


reject_dtensor("indexer_scores", "indexer_scores_backward", "indexer_topk")
