"""Torch reference of ``dsgraph::ssd_scan`` / ``dsgraph::ssd_step`` (the oracle of every backend, and
the CPU path).

Memory-lean: the sequence is processed in blocks of whole chunks (at most ``_BLOCK_BYTES`` of
[B, H, c, l, l] decay scores per block) with the state carried between blocks, and groups are never
repeated over their heads. The backward recomputes one block at a time, last first, from the
block-boundary states the forward kept, so it holds one block's autograd graph at a time.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import with_autograd

_BLOCK_BYTES = 256 << 20


def check_ssd_args(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                   D: Optional[Tensor], z: Optional[Tensor], initial_states: Optional[Tensor]) -> None:
    """Raise ValueError naming the argument whose shape does not fit x [B, L, H, P]."""
    if x.dim() != 4:
        raise ValueError(f"ssd_scan: x must be [B, L, H, P]; got shape {tuple(x.shape)}")
    b, L, H, P = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, L) or H % B.shape[2]:
        raise ValueError(f"ssd_scan: B must be [B, L, G, N] = [{b}, {L}, G, N] with G dividing H = {H}; "
                         f"got {tuple(B.shape)}")
    G, N = B.shape[2:]
    expected = {"dt": (dt, (b, L, H)), "A": (A, (H,)), "C": (C, (b, L, G, N)), "D": (D, (H,)),
                "z": (z, (b, L, H, P)), "initial_states": (initial_states, (b, H, P, N))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"ssd_scan: {name} must have shape {list(shape)}; got {list(t.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd_scan: chunk_size must be an int >= 1; got {chunk_size!r}")


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _segsum(a: Tensor) -> Tensor:
    """[..., T] -> [..., T, T]: sum of a[j+1..i] below the diagonal, -inf above."""
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T).masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1), 0)
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return a.cumsum(-2).masked_fill(~causal, float("-inf"))


def _block(x, dt, A, B, C, state, chunk_size):
    """One block of whole chunks in the compute dtype, heads as (G, R): x [b, c*l, G, R, P],
    dt [b, c*l, G, R], A [G, R], B/C [b, c*l, G, N], state [b, G, R, P, N] -> (y, state after)."""
    x, dt, B, C = (t.unflatten(1, (-1, chunk_size)) for t in (x, dt, B, C))  # [b, c, l, ...]
    a = (dt * A).permute(0, 3, 4, 1, 2)  # [b, G, R, c, l]
    a_cs = a.cumsum(-1)
    xdt = x * dt[..., None]
    scores = torch.einsum("bclgn,bcsgn->bgcls", C, B)[:, :, None] * torch.exp(_segsum(a))  # [b, G, R, c, l, s]
    y = torch.einsum("bgrcls,bcsgrp->bclgrp", scores, xdt)
    decay_out = torch.exp(a_cs[..., -1:] - a_cs)  # [b, G, R, c, l]
    states = torch.einsum("bclgn,bclgrp->bcgrpn", B, xdt * decay_out.permute(0, 3, 4, 1, 2)[..., None])
    states = torch.cat([state[:, None], states], dim=1)  # [b, c + 1, G, R, P, N]
    decay_chunk = torch.exp(_segsum(F.pad(a_cs[..., -1], (1, 0))))  # [b, G, R, c + 1, c + 1]
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", decay_chunk, states)
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", C, states[:, :-1])
    y = y + y_off * torch.exp(a_cs).permute(0, 3, 4, 1, 2)[..., None]
    return y.flatten(1, 2), states[:, -1]


def _grouped(x, dt, A, B, C, state, ct):
    """Inputs cast to ``ct`` and split into (G, R) heads; state zeros when None."""
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    R = H // G
    state = x.new_zeros(b, H, P, N, dtype=ct) if state is None else state.to(ct)
    return (x.to(ct).unflatten(2, (G, R)), dt.to(ct).unflatten(2, (G, R)), A.to(ct).unflatten(0, (G, R)),
            B.to(ct), C.to(ct), state.unflatten(1, (G, R)))


def _block_len(x: Tensor, B: Tensor, chunk_size: int) -> int:
    b, L, H, _ = x.shape
    per_chunk = b * H * chunk_size * chunk_size * 4 * 3  # scores, decay and their product
    chunks = max(1, _BLOCK_BYTES // per_chunk)
    return min(chunks * chunk_size, -(-L // chunk_size) * chunk_size)


def _scan_block(xs, dts, A, Bs, Cs, state, chunk_size):
    n = xs.shape[1]
    pad = -n % chunk_size  # a zero-padded tail: dt = 0 there leaves the state unchanged
    if pad:
        xs, dts, Bs, Cs = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xs, dts, Bs, Cs))
    y, state = _block(xs, dts, A, Bs, Cs, state, chunk_size)
    return y[:, :n], state


def _epilogue(y, x, D, z, ct):
    """y [b, L, G, R, P] (compute dtype) -> [b, L, H, P] with the D skip and the z gate, and y before the gate."""
    y = y.flatten(2, 3)
    if D is not None:
        y = y + x.to(ct) * D.to(ct)[:, None]
    if z is None:
        return y, None
    return y * F.silu(z.to(ct)), y


def ssd_scan_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                 D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                 initial_states: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y in x's dtype, final state in the compute dtype, y before the z gate in x's dtype or an empty
    tensor without z). See dsgraph/ops/ssd.py for the semantics."""
    check_ssd_args(x, dt, A, B, C, chunk_size, D, z, initial_states)
    ct = compute_dtype(x)
    xg, dtg, Ag, Bc, Cc, state = _grouped(x, dt, A, B, C, initial_states, ct)
    step = _block_len(x, B, chunk_size)
    ys = []
    for start in range(0, x.shape[1], step):
        sl = slice(start, start + step)
        y, state = _scan_block(xg[:, sl], dtg[:, sl], Ag, Bc[:, sl], Cc[:, sl], state, chunk_size)
        ys.append(y)
    y, ungated = _epilogue(torch.cat(ys, dim=1) if ys else xg.new_zeros(xg.shape), x, D, z, ct)
    residual = x.new_empty(0) if ungated is None else ungated.to(x.dtype)
    return y.to(x.dtype), state.flatten(1, 2), residual


def ssd_scan_ref_backward(dy: Tensor, dfinal: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          chunk_size: int, D: Optional[Tensor], z: Optional[Tensor],
                          initial_states: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Gradients (dx, ddt, dA, dB, dC, dD, dz, dinitial_states) in the inputs' dtypes (None for absent
    inputs), one block at a time."""
    with with_autograd():
        return _backward(dy, dfinal, x, dt, A, B, C, chunk_size, D, z, initial_states)


def _backward(dy, dfinal, x, dt, A, B, C, chunk_size, D, z, initial_states):
    ct = compute_dtype(x)
    xg, dtg, Ag, Bc, Cc, state = _grouped(x, dt, A, B, C, initial_states, ct)
    step = _block_len(x, B, chunk_size)
    starts = list(range(0, x.shape[1], step))
    boundaries, ys = [], []
    with torch.no_grad():
        for start in starts:
            boundaries.append(state)
            sl = slice(start, start + step)
            y, state = _scan_block(xg[:, sl], dtg[:, sl], Ag, Bc[:, sl], Cc[:, sl], state, chunk_size)
            ys.append(y)
    # D and z act elementwise after the scan: their gradients (and the one reaching the scan) come
    # from the whole y at once.
    with torch.enable_grad():
        y_scan = (torch.cat(ys, dim=1) if ys else xg.new_zeros(xg.shape)).requires_grad_()
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, D, z)]
        out, _ = _epilogue(y_scan, *leaves, ct)
        wanted = [y_scan] + [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out.to(x.dtype), wanted, dy, allow_unused=True))
        dy_scan = next(grads)
        dx_skip, dD, dz = (next(grads) if t is not None else None for t in leaves)
    dxg, ddtg, dBc, dCc = (torch.zeros_like(t) for t in (xg, dtg, Bc, Cc))
    dAg = torch.zeros_like(Ag)
    dstate = dfinal.to(ct).unflatten(1, tuple(Ag.shape))
    for start, h0 in zip(reversed(starts), reversed(boundaries)):
        sl = slice(start, start + step)
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (xg[:, sl], dtg[:, sl], Ag, Bc[:, sl], Cc[:, sl], h0)]
            y, h1 = _scan_block(*inputs, chunk_size)
            g = torch.autograd.grad((y, h1), inputs, (dy_scan[:, sl], dstate), allow_unused=True)
        for acc, grad in zip((dxg[:, sl], ddtg[:, sl], dAg, dBc[:, sl], dCc[:, sl]), g[:5]):
            if grad is not None:
                acc += grad
        dstate = g[5] if g[5] is not None else torch.zeros_like(h0)
    dx = dxg.flatten(2, 3) + (dx_skip.to(ct) if dx_skip is not None else 0)
    return (dx.to(x.dtype), ddtg.flatten(2, 3).to(dt.dtype), dAg.flatten().to(A.dtype), dBc.to(B.dtype),
            dCc.to(C.dtype), None if D is None else dD.to(D.dtype), None if z is None else dz.to(z.dtype),
            None if initial_states is None else dstate.flatten(1, 2).to(initial_states.dtype))


def ssd_step_ref(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Optional[Tensor] = None, z: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One recurrence step: state [b, H, P, N], x [b, H, P], dt [b, H], A [H], B/C [b, G, N], D [H],
    z [b, H, P] -> (y [b, H, P] in x's dtype, new state in the compute dtype)."""
    ct = compute_dtype(x)
    b, H, P = x.shape
    G = B.shape[1]
    xs = x.to(ct).unflatten(1, (G, H // G))
    dt = dt.to(ct).unflatten(1, (G, H // G))
    decay = torch.exp(dt * A.to(ct).unflatten(0, (G, H // G)))  # [b, G, R]
    new = state.to(ct).unflatten(1, (G, H // G)) * decay[..., None, None] + \
        (dt[..., None] * xs)[..., None] * B.to(ct)[:, :, None, None, :]
    y = torch.einsum("bgrpn,bgn->bgrp", new, C.to(ct)).flatten(1, 2)
    if D is not None:
        y = y + D.to(ct)[:, None] * x.to(ct)
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype), new.flatten(1, 2)
