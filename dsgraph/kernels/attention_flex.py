"""PyTorch's FlexAttention for the bands and sinks SDPA cannot express.

The attention pass emits :func:`attention_flex` into the graph (as it emits SDPA), so Inductor
lowers ``flex_attention`` to its fused Triton kernels, forward and backward, and fuses the sink
correction around it. The band becomes a block mask computed from the band limits (O((S/128)·(T/128))
work, never an [S, T] mask); blocks wholly inside the band skip the mask function.

Sink: softmax over [scores, sink] = softmax(scores) · sigmoid(lse − sink), lse from
``flex_attention``. Autograd differentiates the correction, so with σ = sigmoid(lse − sink) and
O the flex output: dO = dout·σ, dlse = σ(1−σ)·Σ_d dout·O, dsink = −Σ_{b,i} dlse — flex's backward
takes the lse gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import with_autograd

_BLOCK = 128  # FlexAttention's default sparse block size
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def flex_unsupported_reason(q, k, v, *, scale, sink=None, bias=None, lower=None, upper=None,
                            topk=None) -> Optional[str]:
    if q.device.type != "cuda":
        # Inductor's CPU FlexAttention has neither the lse (sinks) nor a backward; the torch
        # reference serves CPU sites.
        return f"device {q.device.type} (FlexAttention's compiled kernels here: cuda)"
    if topk is not None:
        return "FlexAttention is not given top-k index masks here"
    if bias is not None:
        return "FlexAttention is not given additive biases here"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} (FlexAttention takes one of float16, bfloat16, float32)"
    for name, dim in (("q/k", q.shape[-1]), ("v", v.shape[-1])):
        if dim % 16 or not 16 <= dim <= 256:
            return f"{name} head dim {dim} (FlexAttention here: multiples of 16 in [16, 256])"
    return None


def band_mask_mod(lower: Optional[int], upper: Optional[int]):
    """The mask function of ``lower <= j - i <= upper`` (None: unbounded)."""
    def mask_mod(b, h, q_idx, kv_idx):
        diff = kv_idx - q_idx
        if lower is None and upper is None:
            return diff == diff
        if lower is None:
            return diff <= upper
        if upper is None:
            return diff >= lower
        return (diff >= lower) & (diff <= upper)
    return mask_mod


def band_block_mask(seq: int, keys: int, lower: Optional[int], upper: Optional[int], device,
                    block: int = _BLOCK):
    """The BlockMask of the band from its limits alone. A tile is skipped when no (i, j) in it is in
    the band, "full" (no mask function call) when it lies wholly inside the band and the sequence."""
    from torch.nn.attention.flex_attention import BlockMask

    nq, nk = -(-seq // block), -(-keys // block)
    q0 = torch.arange(nq, device=device)[:, None] * block
    k0 = torch.arange(nk, device=device)[None, :] * block
    q1 = torch.clamp(q0 + block, max=seq) - 1  # last row / key inside the sequence
    k1 = torch.clamp(k0 + block, max=keys) - 1
    lo_diff, hi_diff = k0 - q1, k1 - q0  # range of j - i over the tile
    lo = -seq if lower is None else lower
    hi = keys if upper is None else upper
    touched = (hi_diff >= lo) & (lo_diff <= hi)
    inside = (lo_diff >= lo) & (hi_diff <= hi) & (q0 + block <= seq) & (k0 + block <= keys)
    partial = touched & ~inside

    def listed(flags):  # per q tile: the number of flagged kv tiles and their indices, listed first
        order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return flags.sum(-1).to(torch.int32)[None, None], order[None, None]

    num, idx = listed(partial)
    full_num, full_idx = listed(inside)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=band_mask_mod(lower, upper), seq_lengths=(seq, keys))


def sink_correction(out: Tensor, lse: Tensor, sink: Tensor) -> tuple[Tensor, Tensor]:
    """Fold a per-head sink column into attention computed without it: ``out`` [B, H, S, Dv] and
    its natural-log ``lse`` [B, H, S] (fp32) -> the output and lse of softmax over [scores, sink]."""
    sink = sink.float().view(1, -1, 1)
    keep = torch.sigmoid(lse - sink)
    return (out.float() * keep[..., None]).to(out.dtype), torch.logaddexp(lse, sink)


def attention_flex(q: Tensor, k: Tensor, v: Tensor, sink: Optional[Tensor], scale: float,
                   lower: Optional[int], upper: Optional[int]) -> Tensor:
    """``dsgraph::attention``'s output through ``flex_attention`` (no bias, no top-k): what the
    attention pass emits for backend ``flex``. Differentiable (flex's own backward)."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    seq, keys = q.shape[2], k.shape[2]
    block_mask = None
    if lower is not None or upper is not None:
        block_mask = band_block_mask(seq, keys, lower, upper, q.device)
    gqa = q.shape[1] != k.shape[1]
    if sink is None:
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                              return_aux=AuxRequest(lse=True))
    return sink_correction(out, aux.lse, sink)[0]


def attention_flex_op(q, k, v, *, scale, sink=None, bias=None, lower=None, upper=None, topk=None):
    """The custom op's ``flex`` forward (a direct call of ``dsgraph::attention``): out and an empty
    lse (its backward recomputes)."""
    reason = flex_unsupported_reason(q, k, v, scale=scale, sink=sink, bias=bias, lower=lower, upper=upper,
                                     topk=topk)
    if reason is not None:
        raise ValueError(f"attention_flex cannot serve this call: {reason}")
    return attention_flex(q, k, v, sink, scale, lower, upper), q.new_empty((0,), dtype=torch.float32)


def attention_flex_op_backward(q, k, v, dout, *, scale, sink=None, bias=None, lower=None, upper=None,
                               topk=None):
    """(dq, dk, dv, dsink) by recomputing the forward under autograd."""
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    sink_leaf = None if sink is None else sink.detach().requires_grad_(True)
    with with_autograd(), torch.enable_grad():
        out = attention_flex(*leaves, sink_leaf, scale, lower, upper)
        grads = torch.autograd.grad(out, leaves + ([sink_leaf] if sink is not None else []), dout)
    return (*grads[:3], grads[3] if sink is not None else None)
