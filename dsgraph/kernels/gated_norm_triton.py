"""Triton kernels for ``dsgraph::gated_rmsnorm``, forward and backward (semantics: ``gated_norm_ref``).

A program owns BLOCK_M rows of one group (grid: row blocks x groups) and reads each of x, gate and
the incoming gradient once: u = x · silu(gate), the group's rstd, the output (forward) or dx, dgate
(backward) all in fp32 registers. The backward recomputes rstd instead of saving it (one more
reduction over values already loaded). dweight: each backward program loops over row blocks
(persistent) and sums its [group] slice of dout · u · rstd in registers; the per-program partials
[P, D] are summed by torch. Rows are addressed with their stride, so a row-strided view (the z or
y slice of the Mamba2 in_proj output) is read in place; offsets are int64.
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
MAX_GROUP = 1 << 14  # one group's row is one register tile


def triton_unsupported_reason(x, gate, weight, eps, group_size, out_dtype=None) -> Optional[str]:
    reason = triton_device_reason([x, gate, weight], _INTERPRET, "Triton gated RMSNorm")
    if reason is not None:
        return reason
    for name, dtype in (("x", x.dtype), ("gate", None if gate is None else gate.dtype), ("weight", weight.dtype),
                        ("out_dtype", out_dtype)):
        if dtype is not None and dtype not in _DTYPES:
            return f"{name} dtype {dtype} not supported (fp16, bf16, fp32)"
    if group_size > MAX_GROUP:
        return f"group_size {group_size} > {MAX_GROUP}: a group no longer fits one register tile"
    return None


@triton.jit
def _fwd(X, Z, W, OUT, M, sx, sz, so, eps,
         GS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_Z: tl.constexpr):
    g = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col = g * GS + cols
    mask = (rows < M)[:, None] & (cols < GS)[None, :]
    u = tl.load(X + rows[:, None] * sx + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + rows[:, None] * sz + col[None, :], mask=mask, other=0.0).to(tl.float32)
        u = u * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(u * u, 1) / GS + eps)
    w = tl.load(W + col, mask=cols < GS, other=0.0).to(tl.float32)
    y = u * rstd[:, None] * w[None, :]
    tl.store(OUT + rows[:, None] * so + col[None, :], y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd(X, Z, W, DY, DX, DZ, DW, M, D, n_blocks, sx, sz, sdy, sdx, sdz, eps,
         GS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_Z: tl.constexpr):
    g = tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    col = g * GS + cols
    w = tl.load(W + col, mask=cols < GS, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), tl.float32)
    for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < M)[:, None] & (cols < GS)[None, :]
        x = tl.load(X + rows[:, None] * sx + col[None, :], mask=mask, other=0.0).to(tl.float32)
        u = x
        if HAS_Z:
            z = tl.load(Z + rows[:, None] * sz + col[None, :], mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            u = x * z * sig
        rstd = 1.0 / tl.sqrt(tl.sum(u * u, 1) / GS + eps)
        n = u * rstd[:, None]
        dy = tl.load(DY + rows[:, None] * sdy + col[None, :], mask=mask, other=0.0).to(tl.float32)
        dw += tl.sum(dy * n, 0)
        dn = dy * w[None, :]
        # d(u rstd)/du applied to dn: rstd (dn - n mean(dn n))
        du = rstd[:, None] * (dn - n * (tl.sum(dn * n, 1) / GS)[:, None])
        if HAS_Z:
            tl.store(DX + rows[:, None] * sdx + col[None, :], (du * z * sig).to(DX.dtype.element_ty), mask=mask)
            dz = du * x * sig * (1.0 + z * (1.0 - sig))
            tl.store(DZ + rows[:, None] * sdz + col[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
        else:
            tl.store(DX + rows[:, None] * sdx + col[None, :], du.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + tl.program_id(0).to(tl.int64) * D + col, dw, mask=cols < GS)


def _rows(t: Optional[torch.Tensor], d: int) -> Optional[torch.Tensor]:
    """[M, d] with unit column stride, a view where the layout allows (no copy of a row-strided slice)."""
    if t is None:
        return None
    rows = t.reshape(-1, d)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _layout(group_size: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): about 4k elements a program."""
    block_n = triton.next_power_of_2(group_size)
    block_m = max(1, min(64, 4096 // block_n))
    elements = block_m * block_n
    return block_m, block_n, 4 if elements <= 2048 else 8 if elements <= 8192 else 16


def _check(x, gate, weight, eps, group_size, out_dtype=None):
    reason = triton_unsupported_reason(x, gate, weight, eps, group_size, out_dtype)
    if reason is not None:
        raise ValueError(f"gated_rmsnorm_triton: {reason}")


def gated_rmsnorm_triton(x, gate, weight, eps: float, group_size: int, out_dtype=None) -> torch.Tensor:
    _check(x, gate, weight, eps, group_size, out_dtype)
    d = x.shape[-1]
    xs, zs = _rows(x, d), _rows(gate, d)
    m = xs.shape[0]
    out = torch.empty((m, d), dtype=out_dtype or x.dtype, device=x.device)
    if m:
        block_m, block_n, warps = _layout(group_size)
        _fwd[(triton.cdiv(m, block_m), d // group_size)](
            xs, zs if zs is not None else xs, weight.contiguous(), out, m, xs.stride(0),
            zs.stride(0) if zs is not None else 0, out.stride(0), float(eps),
            GS=group_size, BLOCK_M=block_m, BLOCK_N=block_n, HAS_Z=zs is not None, num_warps=warps)
    return out.view(x.shape)


def gated_rmsnorm_triton_backward(x, gate, weight, dout, eps: float, group_size: int):
    _check(x, gate, weight, eps, group_size)
    d = x.shape[-1]
    xs, zs, dys = _rows(x, d), _rows(gate, d), _rows(dout, d)
    m = xs.shape[0]
    dx = torch.empty((m, d), dtype=x.dtype, device=x.device)
    dz = None if gate is None else torch.empty((m, d), dtype=gate.dtype, device=x.device)
    block_m, block_n, warps = _layout(group_size)
    n_blocks, groups = triton.cdiv(m, block_m), d // group_size
    if _INTERPRET or x.device.type != "cuda":
        programs = min(n_blocks, 4)
    else:  # a few waves of programs over the SMs, fewer partial rows to sum
        programs = min(n_blocks, triton.cdiv(4 * torch.cuda.get_device_properties(x.device).multi_processor_count,
                                             groups))
    partial = torch.zeros((max(programs, 1), d), dtype=torch.float32, device=x.device)
    if m:
        _bwd[(programs, groups)](
            xs, zs if zs is not None else xs, weight.contiguous(), dys, dx, dz if dz is not None else dx, partial,
            m, d, n_blocks, xs.stride(0), zs.stride(0) if zs is not None else 0, dys.stride(0), dx.stride(0),
            dz.stride(0) if dz is not None else 0, float(eps),
            GS=group_size, BLOCK_M=block_m, BLOCK_N=block_n, HAS_Z=zs is not None, num_warps=warps)
    dgate = None if dz is None else dz.view(gate.shape)
    return dx.view(x.shape), dgate, partial.sum(0).to(weight.dtype)
