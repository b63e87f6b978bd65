"""Triton ``dsgraph::ssd_step`` (the Mamba2 decode update; semantics: ``ssd_ref.ssd_step_ref``).

Out of place in one pass over the state: a program reads one [BLOCK_P, N] tile of the old state (one
batch row, one head, BLOCK_P head channels; N padded to a power of two with masks) and writes the
new tile to a fresh buffer, reading y out of the tile while it is in registers::

    new = state * exp(dt A) + (dt x)[:, None] * B[None, :]
    y   = (sum_n new * C + D x) * silu(z)

mamba-ssm's ``selective_state_update`` updates its state in place, so the functional op must copy the
state first and moves it twice (read + write for the copy, again for the update); this kernel moves it
once. Math in fp32 whatever the input dtypes, y rounded once to x's dtype, the new state fp32. Every
input is read through its strides (the graph hands in slices of in_proj's output); offsets are int64.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .common import triton_device_reason

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_STATE = 256  # N: one padded row of the tile per head channel
_MAX_P = 65535 * 4  # blocks of >= 4 head channels on the grid's second axis


def _configs() -> list[triton.Config]:
    """Tiles of BLOCK_P head channels; under the interpreter one (no timing there)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_P": 4}, num_warps=1)]
    # A memory-bound stream: small tiles for many programs in flight (mamba-ssm's update uses 4 x 128 per
    # program at N = 128); the larger ones where N is small. Out of place, so re-running to time is harmless.
    return [triton.Config({"BLOCK_P": p}, num_warps=w) for p, w in ((4, 4), (8, 4), (16, 4), (32, 8))]


def _prune(configs, named_args, **kwargs):
    """No tile much larger than the head dim (its rows would all be masked)."""
    p = triton.next_power_of_2(named_args["P"])
    return [c for c in configs if c.kwargs["BLOCK_P"] <= max(p, 4)] or configs[:1]


@triton.autotune(configs=_configs(), key=["P", "BLOCK_N", "HAS_D", "HAS_Z"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _step(S, X, DT, A, B, C, D, Z, Y, NEW,
          H, R, P, N,
          ss_b, ss_h, ss_p, ss_n, sx_b, sx_h, sx_p, sdt_b, sdt_h, sa, sb_b, sb_g, sb_n, sc_b, sc_g, sc_n,
          sd, sz_b, sz_h, sz_p,
          BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    g = h // R
    p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N).to(tl.int64)
    pm = p < P
    nm = n < N
    tile = pm[:, None] & nm[None, :]

    dt = tl.load(DT + b * sdt_b + h * sdt_h).to(tl.float32)
    decay = tl.exp(dt * tl.load(A + h * sa).to(tl.float32))
    x = tl.load(X + b * sx_b + h * sx_h + p * sx_p, mask=pm, other=0.0).to(tl.float32)
    Bn = tl.load(B + b * sb_b + g * sb_g + n * sb_n, mask=nm, other=0.0).to(tl.float32)
    Cn = tl.load(C + b * sc_b + g * sc_g + n * sc_n, mask=nm, other=0.0).to(tl.float32)
    state = tl.load(S + b * ss_b + h * ss_h + p[:, None] * ss_p + n[None, :] * ss_n, mask=tile, other=0.0)
    new = state * decay + (dt * x)[:, None] * Bn[None, :]
    tl.store(NEW + (bh * P + p[:, None]) * N + n[None, :], new, mask=tile)

    y = tl.sum(new * Cn[None, :], 1)
    if HAS_D:
        y += tl.load(D + h * sd).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(Z + b * sz_b + h * sz_h + p * sz_p, mask=pm, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(Y + bh * P + p, y.to(Y.dtype.element_ty), mask=pm)


def step_unsupported(state, x, dt, A, B, C, *, D=None, z=None) -> Optional[str]:
    tensors = dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z)
    reason = triton_device_reason(tensors.values(), _INTERPRET, "Triton SSD step")
    if reason is not None:
        return reason
    if state.dtype != torch.float32:
        return f"state dtype {state.dtype}: the kernel keeps an fp32 state"
    bad = {k: str(t.dtype) for k, t in tensors.items() if t is not None and t.dtype not in _DTYPES}
    if bad:
        return f"dtypes {bad} outside float16/bfloat16/float32 (the kernel computes in fp32)"
    if B.shape[-1] > MAX_STATE:
        return f"state size N = {B.shape[-1]} > {MAX_STATE}: a head channel's state row is one register row"
    if x.shape[-1] > _MAX_P:
        return f"head dim P = {x.shape[-1]} > {_MAX_P}: its blocks are the grid's second axis (at most 65535)"
    return None


def step_forward(state, x, dt, A, B, C, *, D=None, z=None) -> tuple[torch.Tensor, torch.Tensor]:
    reason = step_unsupported(state, x, dt, A, B, C, D=D, z=z)
    if reason is not None:
        raise ValueError(f"ssd_step (triton): {reason}")
    b, H, P = x.shape
    G, N = B.shape[1:]
    y = torch.empty((b, H, P), dtype=x.dtype, device=x.device)
    new = torch.empty((b, H, P, N), dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y, new
    # An absent D or z: x stands in as a pointer the kernel never reads (HAS_D / HAS_Z off).
    Dp, Zp = (x if D is None else D), (x if z is None else z)
    z_strides = (0, 0, 0) if z is None else z.stride()
    _step[lambda meta: (b * H, triton.cdiv(P, meta["BLOCK_P"]))](
        state, x, dt, A, B, C, Dp, Zp, y, new,
        H, H // G, P, N,
        *state.stride(), *x.stride(), *dt.stride(), A.stride(0), *B.stride(), *C.stride(),
        0 if D is None else D.stride(0), *z_strides,
        BLOCK_N=triton.next_power_of_2(max(N, 1)), HAS_D=D is not None, HAS_Z=z is not None)
    return y, new
