"""dsgraph::hadamard: the op (errors, autograd, DTensor), the torch reference against a dense float64
oracle, the Triton kernel against the reference (the interpreter on CPU), the TileLang kernel
compiled for sm_90a with nvcc, and both kernels on a GPU."""
import shutil

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, strategies as st

import dsgraph.ops.hadamard  # noqa: F401  (registers dsgraph::hadamard)
from dsgraph.kernels.hadamard_ref import hadamard_ref
from dsgraph.kernels.hadamard_tilelang import sylvester, tilelang_unsupported_reason
from dsgraph.kernels.hadamard_triton import hadamard_triton, triton_unsupported_reason
from dsgraph.ops.hadamard import MAX_SIZE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
hadamard = torch.ops.dsgraph.hadamard


def dense(x, scale):
    """The oracle: scale * x @ H_n in float64."""
    return (x.double() @ sylvester(x.shape[-1], torch.float64, x.device)) * scale


@given(st.integers(0, 10), st.lists(st.integers(0, 3), max_size=2), st.sampled_from([torch.float32, torch.bfloat16,
                                                                                       torch.float16, torch.float64]))
def test_reference_is_the_dense_product_rounded_once(log_n, lead, dtype):
    x = torch.randn(*lead, 2 ** log_n).to(dtype)
    torch.testing.assert_close(hadamard_ref(x, 0.7), dense(x, 0.7).to(dtype))


def test_reference_chunks_rows(monkeypatch):
    monkeypatch.setattr("dsgraph.kernels.hadamard_ref.CHUNK_ELEMENTS", 64)
    x = torch.randn(7, 32)
    torch.testing.assert_close(hadamard_ref(x, 1.0), dense(x, 1.0).float())


@pytest.mark.parametrize("n", [3, 0, 2 * MAX_SIZE])
def test_bad_sizes_name_the_argument_and_range(n):
    with pytest.raises(ValueError, match=rf"x.shape\[-1\] must be a power of 2 in \[1, {MAX_SIZE}\], got {n}"):
        hadamard(torch.randn(2, n), 1.0, "torch")


def test_bad_dtype_and_scale_are_named():
    with pytest.raises(ValueError, match="x.dtype must be one of"):
        hadamard(torch.ones(2, 4, dtype=torch.int32), 1.0, "torch")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        hadamard(torch.randn(2, 4), float("inf"), "torch")


def test_backward_is_the_transform_again():
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: hadamard(t, 0.3, "torch"), (x,))
    hadamard(x, 0.3, "torch").sum().backward()
    torch.testing.assert_close(x.grad, hadamard_ref(torch.ones(3, 16, dtype=torch.float64), 0.3))


def test_a_dtensor_is_a_clear_error():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = distribute_tensor(torch.randn(4, 8), init_device_mesh("cpu", (1,)), [Shard(0)])
        with pytest.raises(NotImplementedError, match=r"dsgraph::hadamard .*x: DTensor placements=\(Shard\(dim=0\),\)"):
            hadamard(x, 1.0, "torch")
    finally:
        dist.destroy_process_group()


@given(st.integers(0, 9), st.integers(1, 40), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       st.floats(-2, 2).filter(lambda s: abs(s) > 1e-3))
def test_triton_matches_the_reference(log_n, rows, dtype, scale):
    x = torch.randn(rows, 2 ** log_n).to(dtype).to(DEVICE)
    torch.testing.assert_close(hadamard_triton(x, scale), hadamard_ref(x, scale))


def test_triton_two_factor_tiles_and_strided_input():
    x = torch.randn(5, 3, 1024).transpose(0, 1).to(DEVICE)  # non-contiguous rows: the kernel copies
    torch.testing.assert_close(hadamard_triton(x, 0.5), hadamard_ref(x, 0.5))


def test_unsupported_reasons():
    assert triton_unsupported_reason(torch.empty(2, 2 ** 15, device="meta"), 1.0) is not None
    assert "float64" in triton_unsupported_reason(torch.empty(2, 8, dtype=torch.float64, device=DEVICE), 1.0)
    assert "CUDA" in tilelang_unsupported_reason(torch.empty(2, 64), 1.0)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("n,dtype", [(16, torch.float16), (128, torch.bfloat16), (256, torch.bfloat16)])
def test_tilelang_kernel_compiles_for_sm90a_with_nvcc(n, dtype):
    pytest.importorskip("tilelang")
    from dsgraph.kernels.hadamard_tilelang import compile_sm90
    source, cubin = compile_sm90(n, dtype, n ** -0.5)
    assert cubin[:4] == b"\x7fELF", "nvcc produced no cubin"
    assert "wgmma" in source  # Hopper tensor-core instructions, not a fallback


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 16, 128, 256, 1024, 4096, 16384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_triton_matches_the_reference(n, dtype):
    x = torch.randn(333, n, device="cuda").to(dtype)
    torch.testing.assert_close(hadamard_triton(x, n ** -0.5), hadamard_ref(x, n ** -0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [16, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_tilelang_matches_the_reference(n, dtype):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TileLang kernel is written for Hopper")
    from dsgraph.kernels.hadamard_tilelang import hadamard_tilelang
    x = torch.randn(333, n, device="cuda").to(dtype)  # 333: a partial last tile
    torch.testing.assert_close(hadamard_tilelang(x, n ** -0.5), hadamard_ref(x, n ** -0.5))
