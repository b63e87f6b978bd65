"""Torch reference for ``dsgraph::gated_rmsnorm`` (the test oracle), forward and backward.

Rows are processed in chunks of at most ``CHUNK_ELEMENTS`` so the fp32 working copies stay small
whatever the input size. The math follows the op's definition (see ``dsgraph/ops/gated_norm.py``):
u = x · silu(gate), r = rsqrt(mean_group(u²) + eps), out = u · r · weight, in fp32 (fp64 for fp64
inputs).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24


def _rows(t: Optional[Tensor], d: int) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1, d)


def _compute(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _gated(x: Tensor, gate: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """(u, sigmoid(gate)) in the compute dtype for one chunk of rows."""
    x = x.to(_compute(x))
    if gate is None:
        return x, None
    g = gate.to(x.dtype)
    sig = torch.sigmoid(g)
    return x * g * sig, sig


def gated_rmsnorm_ref(x: Tensor, gate: Optional[Tensor], weight: Tensor, eps: float, group_size: int,
                      out_dtype: Optional[torch.dtype] = None) -> Tensor:
    d = x.shape[-1]
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    xs, gs, os_ = _rows(x, d), _rows(gate, d), out.view(-1, d)
    w = weight.to(_compute(x))
    step = max(1, CHUNK_ELEMENTS // d)
    for start in range(0, xs.shape[0], step):
        sl = slice(start, start + step)
        u, _ = _gated(xs[sl], None if gs is None else gs[sl])
        grouped = u.view(u.shape[0], -1, group_size)
        r = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
        os_[sl] = (grouped * r).view(u.shape) * w
    return out


def gated_rmsnorm_ref_backward(x: Tensor, gate: Optional[Tensor], weight: Tensor, dout: Tensor, eps: float,
                               group_size: int) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """(dx, dgate or None, dweight), each in its input's dtype."""
    d = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dgate = None if gate is None else torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dw = torch.zeros(d, dtype=_compute(x), device=x.device)
    xs, gs, dys = _rows(x, d), _rows(gate, d), _rows(dout, d)
    dxs, dgs = dx.view(-1, d), _rows(dgate, d)
    w = weight.to(dw.dtype)
    step = max(1, CHUNK_ELEMENTS // d)
    for start in range(0, xs.shape[0], step):
        sl = slice(start, start + step)
        u, sig = _gated(xs[sl], None if gs is None else gs[sl])
        n_rows = u.shape[0]
        grouped = u.view(n_rows, -1, group_size)
        r = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
        dy = dys[sl].to(u.dtype)
        dw += (dy * (grouped * r).view(n_rows, d)).sum(0)
        dn = (dy * w).view(n_rows, -1, group_size)
        # d(u r)/du applied to dn: r dn - u r³ mean(dn u)
        du = (r * dn - grouped * r.pow(3) * (dn * grouped).mean(-1, keepdim=True)).view(n_rows, d)
        if gs is None:
            dxs[sl] = du
            continue
        g = gs[sl].to(u.dtype)
        dxs[sl] = du * g * sig
        # silu'(g) = sig (1 + g (1 - sig))
        dgs[sl] = du * xs[sl].to(u.dtype) * sig * (1 + g * (1 - sig))
    return dx, dgate, dw.to(weight.dtype)


def backward_atol(x: Tensor, gate: Optional[Tensor], weight: Tensor, dout: Tensor, eps: float,
                  group_size: int) -> float:
    """An absolute tolerance for comparing two fp32 computations of the backward (tests). d(u·rstd)/du
    subtracts terms of size rstd·|dout·weight| that cancel where a group's values are nearly equal
    in magnitude (a group of one channel normalises to ±1: its gradient is all cancellation), so two
    correct implementations differ by a few ulps of the largest such term (times the gate's factors
    for dx and dgate), however small the gradient itself: 2^-18 of it (32 fp32 ulps)."""
    d = x.shape[-1]
    u, sig = _gated(x.reshape(-1, d), None if gate is None else gate.reshape(-1, d))
    grouped = u.view(u.shape[0], -1, group_size)
    r = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps).expand_as(grouped).reshape(u.shape)
    terms = r * (dout.reshape(-1, d).to(u.dtype) * weight.to(u.dtype)).abs()
    if gate is not None:
        g = gate.reshape(-1, d).to(u.dtype)
        factor = torch.maximum((g * sig).abs(), (x.reshape(-1, d).to(u.dtype) * sig * (1 + g * (1 - sig))).abs())
        terms = terms * torch.clamp(factor, min=1.0)
    return 2.0 ** -18 * float(terms.max()) if terms.numel() else 0.0
