"""``dsgraph::ssd_scan`` / ``ssd_step`` on mamba-ssm's Triton kernels (``_mamba_chunk_scan_combined_fwd``
/ ``_bwd`` and ``selective_state_update``), imported through ``dsgraph.kernels.mamba``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .mamba import mamba_module, mamba_unavailable

_SCAN = "ops.triton.ssd_combined"
_STEP = "ops.triton.selective_state_update"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Its kernels always clamp dt to dt_limit (default (0, inf)) and zero the gradient where clamped; the op
# takes dt as given, so the limit is opened.
_NO_LIMIT = (float("-inf"), float("inf"))


def _common_reason(tensors: dict, submodule: str) -> Optional[str]:
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {t.device.type for t in present.values()}
    if devices != {"cuda"}:
        return f"mamba-ssm's Triton kernels need CUDA tensors; got {sorted(devices)}"
    bad = {k: str(t.dtype) for k, t in present.items() if t.dtype not in _DTYPES}
    if bad:
        return f"dtypes {bad} outside float16/bfloat16/float32"
    return mamba_unavailable(submodule)


def scan_unsupported(x, dt, A, B, C, *, chunk_size, D=None, z=None, initial_states=None,
                     decays_bounded=False) -> Optional[str]:
    P, N = x.shape[-1], B.shape[-1]
    if not decays_bounded:
        return ("mamba-ssm's kernels clip every decay exp(dt*A) at 1 (they assume dt >= 0, A <= 0), which "
                "the graph does not prove (dt from softplus/exp/relu/clamp(min >= 0), A = -exp(...))")
    # Its chunk kernels tile the chunk with tl.dot blocks of powers of two; head dim and state are
    # loaded whole (next power of two) per program.
    if chunk_size < 16 or chunk_size > 256 or chunk_size & (chunk_size - 1):
        return f"chunk_size {chunk_size}: mamba-ssm's kernels take a power of two in [16, 256]"
    if N > 256 or P > 256:
        return f"head dim {P} / state size {N}: mamba-ssm's kernels take at most 256"
    return _common_reason(dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, initial_states=initial_states), _SCAN)


def scan_forward(x, dt, A, B, C, *, chunk_size, D=None, z=None, initial_states=None):
    # Lengths that are not a multiple of the chunk: its kernels mask the tail chunk themselves
    # (chunk_size_limit in every kernel, dt zeroed past the end). Returns (out, out_x, dt, dA_cumsum,
    # states, final_states); out_x (y before the z gate, None without z) and final_states (fp32) are ours.
    fwd = mamba_module(_SCAN)._mamba_chunk_scan_combined_fwd
    out, out_x, _dt, _dA_cumsum, _states, final = fwd(x, dt, A, B, C, chunk_size, D=D, z=z,
                                                      initial_states=initial_states, dt_limit=_NO_LIMIT)
    residual = x.new_empty(0) if z is None else out_x
    return out, final, residual


def scan_backward(dy, dfinal, y, residual, x, dt, A, B, C, *, chunk_size, D=None, z=None, initial_states=None):
    bwd = mamba_module(_SCAN)._mamba_chunk_scan_combined_bwd
    # With z it needs the output before the gate, which the forward returned as the residual.
    out = y if z is None else residual
    dx, ddt, dA, dB, dC, dD, dz, _ddt_bias, dh0 = bwd(
        dy, x, dt, A, B, C, out, chunk_size, D=D, z=z, initial_states=initial_states, dfinal_states=dfinal,
        dt_limit=_NO_LIMIT)
    cast = lambda g, like: None if like is None else g.to(like.dtype)  # noqa: E731
    return (cast(dx, x), cast(ddt, dt), cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), cast(dz, z),
            cast(dh0, initial_states))


def step_unsupported(state, x, dt, A, B, C, *, D=None, z=None) -> Optional[str]:
    if state.dtype != torch.float32:
        return f"state dtype {state.dtype}: the fused update keeps an fp32 state"
    return _common_reason(dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z), _STEP)


def step_forward(state, x, dt, A, B, C, *, D=None, z=None) -> tuple[Tensor, Tensor]:
    """Functional: the kernel updates its state in place, so it gets a copy."""
    update = mamba_module(_STEP).selective_state_update
    b, H, P = x.shape
    N = state.shape[-1]
    new = state.clone()
    # Per-head dt and A broadcast over (P, N) with stride 0: the kernel's tie_hdim fast path. mamba-ssm
    # 2.3.0 unpacks dt_bias's and D's strides unconditionally (None fails), so absent ones are zeros
    # (dt is already discretised; a zero D adds nothing).
    zeros = x.new_zeros(H, 1, dtype=torch.float32)
    y = update(new, x, dt[..., None].expand(b, H, P), A.float()[:, None, None].expand(H, P, N), B, C,
               D=(zeros if D is None else D[:, None]).expand(H, P), z=z,
               dt_bias=zeros.expand(H, P), dt_softplus=False)
    return y, new
