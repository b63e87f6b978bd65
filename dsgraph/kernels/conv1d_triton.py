"""Triton kernels for ``dsgraph::causal_conv1d``, forward and backward, and for
``dsgraph::causal_conv1d_update`` (semantics: ``conv1d_ref``).

Channels-last: x [B, L, C] is read through its strides, so the xBC slice of the Mamba2 in_proj
output (or the transpose the eager code conv'd) is read in place, never copied; a tile is
[BLOCK_L positions, BLOCK_C channels], coalesced over channels.

- Forward: a program per (position block, channel block, batch row) sums the K shifted input
  tiles times the taps in fp32, adds the bias, applies SiLU and stores once.
- Backward, one kernel: dpre = dout · silu'(pre) is needed at positions t .. t + K - 1 for dx[t] =
  Σ_k w[k] dpre[t + K - 1 - k]; the pre-activation there is recomputed from x (K² tile loads for
  the K shifts, L1/L2 hits after the first; no dpre buffer round trip through memory). Programs
  loop over (batch row, position block) tiles (persistent) and sum dweight [K, BLOCK_C] and dbias
  in registers; the per-program partials are summed by torch. Offsets are int64.
- Update (decode), one launch: a program per (channel block, batch row) loads its [BLOCK_C, K - 1]
  conv state tile once (one contiguous span), rounds it to x's dtype as the eager window does, reads
  the L new inputs, writes the L outputs and the shifted state tile. Window column p is state column p
  for p < K - 1, else x row p - (K - 1).
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
MAX_K = 8  # the backward's K² shifted loads grow past that
# Small tiles under the interpreter so tiny test shapes still span several blocks.
_BLOCK_L, _BLOCK_C = (8, 16) if _INTERPRET else (32, 128)


def triton_unsupported_reason(x, weight, bias=None, activation=None) -> Optional[str]:
    reason = triton_device_reason([x, weight, bias], _INTERPRET, "Triton causal conv1d")
    if reason is not None:
        return reason
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _DTYPES:
            return f"{name} dtype {t.dtype} not supported (fp16, bf16, fp32)"
    if weight.shape[1] > MAX_K:
        return f"kernel width {weight.shape[1]} > {MAX_K}"
    return None


def update_unsupported_reason(x, conv_state, weight, bias=None, activation=None) -> Optional[str]:
    reason = triton_unsupported_reason(x, weight, bias, activation) or \
        triton_device_reason([x, conv_state], _INTERPRET, "Triton causal conv1d update")
    if reason is None and conv_state.dtype not in _DTYPES:
        reason = f"conv_state dtype {conv_state.dtype} not supported (fp16, bf16, fp32)"
    return reason


@triton.jit
def _pre(X, W, BIAS, x_base, t, c, L, sxl, sxc, cmask,
         K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr):
    """fp32 pre-activation at positions t (any, masked outside [0, L)) of channels c."""
    acc = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        src = t - (K - 1) + k
        m = ((src >= 0) & (src < L))[:, None] & cmask[None, :]
        xv = tl.load(X + x_base + src.to(tl.int64)[:, None] * sxl + c[None, :] * sxc, mask=m, other=0.0)
        wv = tl.load(W + c * K + k, mask=cmask, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * wv[None, :]
    return acc


@triton.jit
def _fwd(X, W, BIAS, OUT, L, C, sxb, sxl, sxc,
         K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc = _pre(X, W, BIAS, b * sxb, t, c, L, sxl, sxc, cmask, K, BLOCK_L, BLOCK_C, HAS_BIAS)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    mask = (t < L)[:, None] & cmask[None, :]
    tl.store(OUT + (b * L + t.to(tl.int64))[:, None] * C + c[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd(X, W, BIAS, DY, DX, DW, DB, L, C, n_l, n_tiles, sxb, sxl, sxc, sdb, sdl, sdc,
         K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
         HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    kk = tl.arange(0, K_PAD)
    dw = tl.zeros((K_PAD, BLOCK_C), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        b = (tile // n_l).to(tl.int64)
        t = (tile % n_l) * BLOCK_L + tl.arange(0, BLOCK_L)
        dx = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
        for j in tl.static_range(K):  # dpre at positions t + j feeds dx[t] through tap K - 1 - j
            r = t + j
            m = (r < L)[:, None] & cmask[None, :]
            dpre = tl.load(DY + b * sdb + r.to(tl.int64)[:, None] * sdl + c[None, :] * sdc, mask=m,
                           other=0.0).to(tl.float32)
            if SILU:
                pre = _pre(X, W, BIAS, b * sxb, r, c, L, sxl, sxc, cmask, K, BLOCK_L, BLOCK_C, HAS_BIAS)
                sig = tl.sigmoid(pre)
                dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
            wj = tl.load(W + c * K + (K - 1 - j), mask=cmask, other=0.0).to(tl.float32)
            dx += dpre * wj[None, :]
            if j == 0:
                db += tl.sum(dpre, 0)
                for k in tl.static_range(K):
                    src = t - (K - 1) + k
                    xm = ((src >= 0) & (src < L))[:, None] & cmask[None, :]
                    xv = tl.load(X + b * sxb + src.to(tl.int64)[:, None] * sxl + c[None, :] * sxc, mask=xm, other=0.0)
                    dw += tl.where(kk[:, None] == k, tl.sum(dpre * xv.to(tl.float32), 0)[None, :], 0.0)
        mask = (t < L)[:, None] & cmask[None, :]
        tl.store(DX + (b * L + t.to(tl.int64))[:, None] * C + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    p = tl.program_id(0).to(tl.int64)
    tl.store(DW + (p * K + kk)[:, None] * C + c[None, :], dw, mask=(kk < K)[:, None] & cmask[None, :])
    tl.store(DB + p * C + c, db, mask=cmask)


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """fp32 ``v`` rounded to DTYPE's precision, to nearest even, as torch's cast (the new state must equal
    eager's bit for bit); for bf16 written out on the bits: the Triton interpreter truncates there."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return v.to(DTYPE).to(tl.float32)


@triton.jit
def _window_column(state, x_row0, p, j, cmask, sxl, K: tl.constexpr):
    """fp32 window column p (a runtime position) of the program's channels; ``state`` is the
    [BLOCK_C, KS_PAD] state tile, ``x_row0`` points at x[b, 0, c]."""
    from_state = tl.sum(tl.where(j[None, :] == p, state, 0.0), 1)  # 0 unless p < K - 1
    # the row as an int64 vector: 64-bit offsets, and the interpreter mistypes a mask with a scalar term
    row = tl.zeros_like(cmask).to(tl.int64) + p - (K - 1)
    from_x = tl.load(x_row0 + row * sxl, mask=cmask & (row >= 0), other=0.0)
    return from_state + from_x.to(tl.float32)


@triton.jit
def _update(X, S, W, BIAS, OUT, NS, L, C, sxb, sxl, sxc, ssb, ssc, ssk,
            K: tl.constexpr, KS_PAD: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
            SILU: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    j = tl.arange(0, KS_PAD)
    tile = cmask[:, None] & (j < K - 1)[None, :]
    state = tl.load(S + b * ssb + c[:, None] * ssc + j[None, :] * ssk, mask=tile, other=0.0)
    state = _round_to(state.to(tl.float32), OUT.dtype.element_ty)  # eager casts the state to x's dtype first
    x_row0 = X + b * sxb + c * sxc
    for t in range(L):
        acc = tl.zeros((BLOCK_C,), tl.float32)
        if HAS_BIAS:
            acc += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            wk = tl.load(W + c * K + k, mask=cmask, other=0.0).to(tl.float32)
            acc += _window_column(state, x_row0, t + k, j, cmask, sxl, K) * wk
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(OUT + (b * L + t) * C + c, acc.to(OUT.dtype.element_ty), mask=cmask)
    new = tl.zeros((BLOCK_C, KS_PAD), tl.float32)
    for i in tl.static_range(K - 1):  # new state column i = window column L + i
        new = tl.where(j[None, :] == i, _window_column(state, x_row0, L + i, j, cmask, sxl, K)[:, None], new)
    tl.store(NS + (b * C + c[:, None]) * (K - 1) + j[None, :], new.to(NS.dtype.element_ty), mask=tile)


def causal_conv1d_update_triton(x, conv_state, weight, bias, activation: Optional[str]):
    reason = update_unsupported_reason(x, conv_state, weight, bias, activation)
    if reason is not None:
        raise ValueError(f"causal_conv1d_update_triton: {reason}")
    batch, length, channels = x.shape
    k = weight.shape[1]
    out = torch.empty((batch, length, channels), dtype=x.dtype, device=x.device)
    new_state = torch.empty((batch, channels, k - 1), dtype=x.dtype, device=x.device)
    if out.numel():
        # K = 1: no state; the masks never touch S or NS, so any valid pointer does
        state_arg, new_arg = (conv_state, new_state) if k > 1 else (x, out)
        grid = (triton.cdiv(channels, _BLOCK_C), batch)
        _update[grid](x, state_arg, weight.contiguous(), bias if bias is not None else x, out, new_arg,
                      length, channels, *x.stride(), *conv_state.stride(),
                      K=k, KS_PAD=triton.next_power_of_2(max(k - 1, 1)), BLOCK_C=_BLOCK_C,
                      HAS_BIAS=bias is not None, SILU=activation == "silu", num_warps=4)
    return out, new_state


def _check(x, weight, bias, activation):
    reason = triton_unsupported_reason(x, weight, bias, activation)
    if reason is not None:
        raise ValueError(f"causal_conv1d_triton: {reason}")


def causal_conv1d_triton(x, weight, bias, activation: Optional[str]) -> torch.Tensor:
    _check(x, weight, bias, activation)
    batch, length, channels = x.shape
    out = torch.empty((batch, length, channels), dtype=x.dtype, device=x.device)
    if out.numel():
        grid = (triton.cdiv(length, _BLOCK_L), triton.cdiv(channels, _BLOCK_C), batch)
        _fwd[grid](x, weight.contiguous(), bias if bias is not None else x, out, length, channels, *x.stride(),
                   K=weight.shape[1], BLOCK_L=_BLOCK_L, BLOCK_C=_BLOCK_C, HAS_BIAS=bias is not None,
                   SILU=activation == "silu", num_warps=4)
    return out


def causal_conv1d_triton_backward(x, weight, bias, activation: Optional[str], dout):
    _check(x, weight, bias, activation)
    batch, length, channels = x.shape
    k = weight.shape[1]
    dx = torch.empty((batch, length, channels), dtype=x.dtype, device=x.device)
    n_l = triton.cdiv(length, _BLOCK_L)
    n_tiles, n_c = batch * n_l, triton.cdiv(channels, _BLOCK_C)
    if _INTERPRET or x.device.type != "cuda":
        programs = max(1, min(n_tiles, 3))
    else:  # a few waves over the SMs; fewer partials to sum
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        programs = max(1, min(n_tiles, triton.cdiv(4 * sms, n_c)))
    dw = torch.zeros((programs, k, channels), dtype=torch.float32, device=x.device)
    db = torch.zeros((programs, channels), dtype=torch.float32, device=x.device)
    if dx.numel():
        _bwd[(programs, n_c)](x, weight.contiguous(), bias if bias is not None else x, dout, dx, dw, db,
                              length, channels, n_l, n_tiles, *x.stride(), *dout.stride(),
                              K=k, K_PAD=triton.next_power_of_2(k), BLOCK_L=_BLOCK_L, BLOCK_C=_BLOCK_C,
                              HAS_BIAS=bias is not None, SILU=activation == "silu", num_warps=4)
    return dx, dw.sum(0).t().to(weight.dtype), None if bias is None else db.sum(0).to(bias.dtype)
