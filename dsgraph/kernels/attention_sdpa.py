"""PyTorch's scaled_dot_product_attention for the sites it can express exactly.

SDPA has no sink, no index masks and only top-left causal alignment. It does not return the
log-sum-exp, so the backward (which runs inside a custom op, below autograd) recomputes it with the
chunked reference and then runs the reference backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def sdpa_unsupported_reason(q, k, v, *, scale, sink=None, bias=None, lower=None, upper=None,
                            topk=None) -> Optional[str]:
    if sink is not None:
        return "SDPA cannot express an attention sink"
    if topk is not None:
        return "SDPA cannot express a top-k index mask"
    if lower is not None or upper not in (None, 0):
        return f"SDPA expresses only top-left causal masks (got lower={lower}, upper={upper})"
    if upper == 0 and bias is not None:
        return "SDPA takes either is_causal or attn_mask, not both"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} not supported by SDPA"
    if q.shape[1] % k.shape[1]:
        return f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}"
    return None


def attention_sdpa(q, k, v, *, scale, sink=None, bias=None, lower=None, upper=None, topk=None):
    mask = None if bias is None else bias.to(torch.float32 if q.dtype == torch.float32 else q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=upper == 0, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out, q.new_empty((0,), dtype=torch.float32)


def attention_sdpa_backward(q, k, v, dout, **kw):
    from .attention_ref import attention_ref, attention_ref_backward
    out, lse = attention_ref(q, k, v, **kw)
    return attention_ref_backward(q, k, v, out, lse, dout, **kw)
