"""Triton kernel for ``dsgraph::hadamard``: the rotation as tensor-core products, H_n = H_a ⊗ H_b.

A row of n = a·b elements, read as an [a, b] matrix X, maps to H_a X H_b (Sylvester matrices are
symmetric and H_a ⊗ H_b = H_n). A program owns R rows at a time as one [R·a, b] tile T and computes
G (T H_b) with G = I_R ⊗ H_a (skipped when a = 1): two ``tl.dot``s, the matrices generated in
registers from the parity of popcount(i & j). b = n up to 128 (padded to 16, the smallest dot),
else b = 128 and a = n / 128, so n <= 16384 (a 128 x 128 tile per row). (b = 256 would need a
256 x 256 H_b plus the tile in shared memory: more than an H100 has.)

Precision: H is exact in bf16, so the dots run on bf16 tensor cores with fp32 accumulation and the
operands are split into bf16 parts that sum to them: x itself (bf16: 1 part, fp16: 2, both exact;
fp32: 3, 24 bits) and the fp32 intermediate (3 parts, 24 bits: as accurate as fp32 math; with 2 the
error near zero outputs exceeds the reference's by far). Programs loop over tiles (persistent), so
the matrices are built once per program.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SIZE = 1 << 14
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SPLITS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
# The interpreter multiplies bfloat16 bit patterns as integers in tl.dot: there the bf16 parts are
# widened to fp32 before each dot (same values, so the splitting is still what is tested).
_DOT_DTYPE = tl.constexpr(tl.float32 if _INTERPRET else tl.bfloat16)


def triton_unsupported_reason(x: torch.Tensor, scale: float) -> Optional[str]:
    if x.device.type != "cuda" and not (_INTERPRET and x.device.type == "cpu"):
        return f"device {x.device.type} needs TRITON_INTERPRET=1" if x.device.type == "cpu" else \
            f"device {x.device.type} is not CUDA"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} not supported (fp16, bf16, fp32)"
    if x.shape[-1] > MAX_SIZE:
        return f"n={x.shape[-1]} > {MAX_SIZE}: a row no longer fits one tile"
    return None


@triton.jit
def _sylvester(i, j):
    """H[i, j] = (-1)^popcount(i & j) for i, j < 2^16, as fp32."""
    p = i & j
    p ^= p >> 8
    p ^= p >> 4
    p ^= p >> 2
    p ^= p >> 1
    return 1.0 - 2.0 * (p & 1).to(tl.float32)


@triton.jit
def _split_dot(a, b_mat, acc, PARTS: tl.constexpr, DOT_DTYPE: tl.constexpr, A_LEFT: tl.constexpr):
    """acc + (a @ b_mat if A_LEFT else b_mat @ a), with a (fp32) split into PARTS bf16 parts."""
    rest = a
    for _ in tl.static_range(PARTS):
        part = rest.to(tl.bfloat16)
        rest = rest - part.to(tl.float32)
        if A_LEFT:
            acc = tl.dot(part.to(DOT_DTYPE), b_mat, acc, input_precision="ieee")
        else:
            acc = tl.dot(b_mat, part.to(DOT_DTYPE), acc, input_precision="ieee")
    return acc


@triton.jit
def _hadamard_kernel(X, Y, rows, n_tiles, scale,
                     N: tl.constexpr, A: tl.constexpr, B: tl.constexpr, B_PAD: tl.constexpr, R: tl.constexpr,
                     X_PARTS: tl.constexpr, Z_PARTS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    BM: tl.constexpr = R * A
    r = tl.arange(0, BM)
    c = tl.arange(0, B_PAD)
    hb = tl.where((c[:, None] < B) & (c[None, :] < B), _sylvester(c[:, None], c[None, :]), 0.0).to(DOT_DTYPE)
    if A > 1:  # I_R ⊗ H_A
        g = tl.where(r[:, None] // A == r[None, :] // A, _sylvester(r[:, None] % A, r[None, :] % A), 0.0)
        g = g.to(DOT_DTYPE)
    col = (r % A)[:, None] * B + c[None, :]
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        row = tile * R + r // A
        mask = (row < rows)[:, None] & (c < B)[None, :]
        offsets = row.to(tl.int64)[:, None] * N + col
        t = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        z = _split_dot(t, hb, tl.zeros((BM, B_PAD), tl.float32), X_PARTS, DOT_DTYPE, True)
        if A > 1:
            z = _split_dot(z, g, tl.zeros((BM, B_PAD), tl.float32), Z_PARTS, DOT_DTYPE, False)
        tl.store(Y + offsets, (z * scale).to(Y.dtype.element_ty), mask=mask)


def _layout(n: int) -> tuple[int, int, int, int]:
    """(a, b, b_pad, rows per tile) for a row of n."""
    if n <= 128:
        b_pad = max(n, 16)
        rows = 16 if _INTERPRET else min(128, max(16, 16384 // b_pad))
        return 1, n, b_pad, rows
    a = n // 128
    return a, 128, 128, max(1, 16 // a)


def hadamard_triton(x: torch.Tensor, scale: float) -> torch.Tensor:
    reason = triton_unsupported_reason(x, scale)
    if reason is not None:
        raise ValueError(f"hadamard_triton: {reason}")
    n = x.shape[-1]
    rows_in = x.reshape(-1, n).contiguous()
    out = torch.empty_like(rows_in)
    rows = rows_in.shape[0]
    if rows == 0:
        return out.view(x.shape)
    a, b, b_pad, r = _layout(n)
    n_tiles = triton.cdiv(rows, r)
    programs = n_tiles if _INTERPRET else min(n_tiles, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    warps = 8 if r * a * b_pad >= 128 * 128 else 4
    _hadamard_kernel[(programs,)](rows_in, out, rows, n_tiles, float(scale), N=n, A=a, B=b, B_PAD=b_pad, R=r,
                                  X_PARTS=_SPLITS[x.dtype], Z_PARTS=3, DOT_DTYPE=_DOT_DTYPE,
                                  num_warps=warps)
    return out.view(x.shape)
