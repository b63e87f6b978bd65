"""``dsgraph::gated_rmsnorm`` on mamba-ssm's gated RMSNorm Triton kernels (the ones behind
``rmsnorm_fn``: ``_layer_norm_fwd`` / ``_layer_norm_bwd`` with ``norm_before_gate=False``), imported
through ``dsgraph.kernels.mamba``. The backward reruns the forward kernel for the per-group rstd
(the op saves its inputs only, as the other backends recompute it)."""
from __future__ import annotations

from typing import Optional

import torch

from .mamba import mamba_module, mamba_unavailable

_NORM = "ops.triton.layernorm_gated"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rows(t: Optional[torch.Tensor], d: int) -> Optional[torch.Tensor]:
    if t is None:
        return None
    rows = t.reshape(-1, d)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def mamba_unsupported_reason(x, gate, weight, eps, group_size, out_dtype=None) -> Optional[str]:
    present = [t for t in (x, gate, weight) if t is not None]
    devices = {t.device.type for t in present}
    if devices != {"cuda"}:
        return f"mamba-ssm's Triton kernels need CUDA tensors; got {sorted(devices)}"
    for name, dtype in (("x", x.dtype), ("gate", None if gate is None else gate.dtype), ("weight", weight.dtype),
                        ("out_dtype", out_dtype)):
        if dtype is not None and dtype not in _DTYPES:
            return f"{name} dtype {dtype} not supported (fp16, bf16, fp32)"
    if group_size * x.element_size() > 65536:
        return f"group of {group_size} x {x.element_size()} bytes: mamba-ssm's kernel takes at most 64 KiB"
    d = x.shape[-1]
    # Its kernels offset rows as program_id * row stride in int32.
    span = max(t.reshape(-1, d).stride(0) if t.dim() > 1 else d for t in (x, gate) if t is not None)
    if x.numel() // max(d, 1) * span >= 2 ** 31:
        return f"{x.numel() // max(d, 1)} rows x row stride {span} >= 2^31: mamba-ssm's kernel indexes in int32"
    return mamba_unavailable(_NORM)


def _forward(x, gate, weight, eps, group_size, out_dtype):
    d = x.shape[-1]
    xs, zs = _rows(x, d), _rows(gate, d)
    out = torch.empty(xs.shape, dtype=out_dtype or x.dtype, device=x.device)
    if xs.shape[0] == 0:
        return out, None
    _, _, rstd = mamba_module(_NORM)._layer_norm_fwd(xs, weight.contiguous(), None, eps, z=zs, out=out,
                                                     group_size=group_size, norm_before_gate=False,
                                                     is_rms_norm=True)
    return out, rstd


def gated_rmsnorm_mamba(x, gate, weight, eps: float, group_size: int, out_dtype=None) -> torch.Tensor:
    return _forward(x, gate, weight, eps, group_size, out_dtype)[0].view(x.shape)


def gated_rmsnorm_mamba_backward(x, gate, weight, dout, eps: float, group_size: int):
    d = x.shape[-1]
    _, rstd = _forward(x, gate, weight, eps, group_size, x.dtype)
    if rstd is None:
        return torch.empty_like(x), None if gate is None else torch.empty_like(gate), torch.zeros_like(weight)
    xs, zs = _rows(x, d), _rows(gate, d)
    dx, dw, _db, dz = mamba_module(_NORM)._layer_norm_bwd(
        _rows(dout, d), xs, weight.contiguous(), None, eps, None, rstd, z=zs, group_size=group_size,
        norm_before_gate=False, is_rms_norm=True)
    return dx.view(x.shape), None if gate is None else dz.view(gate.shape), dw.to(weight.dtype)
