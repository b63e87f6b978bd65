"""TileLang kernel for ``dsgraph::hadamard`` on Hopper (sm_90a): one tensor-core product per tile.

A block owns ``BLOCK_M`` rows: it stages them and H_n in shared memory and computes
``scale * (X H_n)`` with ``T.gemm`` (fp32 accumulation). fp16/bf16 inputs are exact on the tensor
cores and H_n (±1) is exact in both, so the result is the fp32-math result rounded once, as the
reference. Served: n in [16, 256] (the dense product costs 2n flops per element, which stays under
the memory time up to 256 on H100), fp16/bf16. Other sites go to the next backend with the reason.
``tilelang`` is imported lazily: importing this module never fails.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

MIN_SIZE, MAX_SIZE = 16, 256
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
TARGET_SM90 = {"kind": "cuda", "arch": "sm_90a"}


def tilelang_unsupported_reason(x: torch.Tensor, scale: float) -> Optional[str]:
    if x.device.type != "cuda":
        return f"device {x.device.type} is not CUDA"
    major, minor = torch.cuda.get_device_capability(x.device)
    if major != 9:
        return f"kernel written for Hopper (capability 9.x), device has {major}.{minor}"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} not supported (fp16, bf16: fp32 would run on tf32 tensor cores)"
    n = x.shape[-1]
    if not MIN_SIZE <= n <= MAX_SIZE:
        return f"n={n} outside [{MIN_SIZE}, {MAX_SIZE}] (one dense product per tile)"
    try:
        import tilelang  # noqa: F401
    except ImportError as exc:
        return f"tilelang not importable ({exc})"
    return None


def sylvester(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """H_n [n, n]: (-1)^popcount(i & j)."""
    i = torch.arange(n, device=device)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    for shift in range(max(n - 1, 1).bit_length()):  # a fixed loop: traceable
        parity = parity ^ ((bits >> shift) & 1)
    return (1 - 2 * parity).to(dtype)


def block_m(n: int) -> int:
    return 128 if n <= 128 else 64


def hadamard_program(n: int, dtype: str, scale: float):
    """The TileLang program for rows of n (the row count is symbolic)."""
    import tilelang.language as T

    rows = T.dynamic("rows")
    bm = block_m(n)

    @T.prim_func
    def hadamard_kernel(X: T.Tensor((rows, n), dtype), H: T.Tensor((n, n), dtype), Y: T.Tensor((rows, n), dtype)):
        with T.Kernel(T.ceildiv(rows, bm), threads=128) as bx:
            x_tile = T.alloc_shared((bm, n), dtype)
            h_tile = T.alloc_shared((n, n), dtype)
            acc = T.alloc_fragment((bm, n), "float32")
            T.copy(X[bx * bm, 0], x_tile)
            T.copy(H, h_tile)
            T.clear(acc)
            T.gemm(x_tile, h_tile, acc)
            for i, j in T.Parallel(bm, n):
                acc[i, j] = acc[i, j] * scale
            T.copy(acc, Y[bx * bm, 0])

    return hadamard_kernel


@functools.lru_cache(maxsize=None)
def compiled(n: int, dtype: str, scale: float, target: str = "auto"):
    """The kernel compiled by tilelang (nvcc) for ``target``, cached per (n, dtype, scale)."""
    import tilelang
    return tilelang.compile(hadamard_program(n, dtype, scale), target=target)


def compile_sm90(n: int, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> tuple[str, bytes]:
    """Lower the kernel for sm_90a and compile it with nvcc, no GPU needed (linking a loadable module
    needs libcuda, so this stops at the cubin): returns (CUDA source, cubin)."""
    import tilelang
    from tilelang import tvm
    from tilelang.cuda.backend import tilelang_callback_cuda_compile
    with tvm.target.Target(TARGET_SM90) as target:  # layout inference reads the target from the context
        source = str(tilelang.lower(hadamard_program(n, _DTYPES[dtype], scale), target=TARGET_SM90).kernel_source)
        return source, bytes(tilelang_callback_cuda_compile(source, target))


@functools.lru_cache(maxsize=None)
def _matrix(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return sylvester(n, dtype, device)


def hadamard_tilelang(x: torch.Tensor, scale: float) -> torch.Tensor:
    reason = tilelang_unsupported_reason(x, scale)
    if reason is not None:
        raise ValueError(f"hadamard_tilelang: {reason}")
    n = x.shape[-1]
    rows_in = x.reshape(-1, n).contiguous()
    out = torch.empty_like(rows_in)
    if rows_in.shape[0]:
        kernel = compiled(n, _DTYPES[x.dtype], float(scale))
        kernel(rows_in, _matrix(n, x.dtype, str(x.device)), out)
    return out.view(x.shape)
