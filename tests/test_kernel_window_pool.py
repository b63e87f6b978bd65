"""dsgraph::window_pool: the op (errors, autograd, fake tensors), the torch reference against DeepSeek V4's eager
Compressor pooling, the Triton kernels against the reference (the interpreter on CPU), the TileLang kernels
compiled for sm_90a without a GPU, and both on a GPU at V4 sizes."""
from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from hypothesis import given, strategies as st

import dsgraph.ops.window_pool  # noqa: F401  (registers dsgraph::window_pool)
from dsgraph.kernels.window_pool_ref import window_pool_ref, window_pool_ref_backward
from dsgraph.kernels.window_pool_triton import triton_unsupported_reason
from dsgraph.models.deepseek_v4 import overlap_transform

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter
pool = torch.ops.dsgraph.window_pool


def eager(kv, score, ape, ratio, overlap):
    """The model's pooling (``DeepseekV4Compressor.forward``) on projections [B, N, w]."""
    P = kv.shape[1] // ratio
    k = kv[:, :P * ratio].unflatten(1, (P, ratio))
    s = score[:, :P * ratio].unflatten(1, (P, ratio))
    if ape is not None:
        s = s + ape
    if overlap:
        k, s = overlap_transform(k, 0.0), overlap_transform(s, float("-inf"))
    return (k * s.softmax(dim=2)).sum(dim=2)


def inputs(B, N, w, ratio, dtype=torch.float32, ape=True, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    kv, score = (torch.randn(B, N, w, generator=gen).to(device, dtype) for _ in range(2))
    return kv, score, (torch.randn(ratio, w, generator=gen).to(device, dtype) if ape else None)


def grads(fn, tensors, grad):
    leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, [t for t in leaves if t is not None], grad)


@st.composite
def sites(draw):
    overlap = draw(st.booleans())
    ratio = draw(st.integers(1, 6))
    w = 2 * draw(st.integers(1, 5)) if overlap else draw(st.integers(1, 9))
    N = draw(st.integers(0, 4 * ratio + 3))
    return draw(st.integers(1, 2)), N, w, ratio, overlap, draw(st.booleans()), draw(st.integers(0, 2 ** 16))


@given(sites())
def test_reference_is_the_models_pooling_forward_and_backward(site):
    B, N, w, ratio, overlap, with_ape, seed = site
    kv, score, ape = inputs(B, N, w, ratio, torch.float64, with_ape, seed, "cpu")
    grad = torch.randn(B, N // ratio, w // 2 if overlap else w, dtype=torch.float64)
    want, want_grads = grads(lambda k, s, a: eager(k, s, a, ratio, overlap), (kv, score, ape), grad)
    torch.testing.assert_close(window_pool_ref(kv, score, ape, ratio, overlap, torch.float64), want)
    got = window_pool_ref_backward(kv, score, ape, grad, ratio, overlap)
    for g, w_ in zip(got, want_grads):
        torch.testing.assert_close(g, w_)


@given(sites(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_triton_matches_the_reference(site, dtype):
    B, N, w, ratio, overlap, with_ape, seed = site
    kv, score, ape = inputs(B, N, w, ratio, dtype, with_ape, seed)
    _check_backend("triton", kv, score, ape, ratio, overlap, seed)


@given(sites(), st.sampled_from([1, 2, 4]), st.sampled_from([1, 2]), st.sampled_from([16, 32]),
       st.sampled_from([1, 2]))
def test_triton_block_configs_match_the_reference(site, block_r, block_p, block_d, programs):
    """The sweepable configs, including windows walked in several slot chunks (block_r < ratio: the
    online softmax and the backward's second read and dape read-modify-write)."""
    from dsgraph.kernels.window_pool_triton import window_pool_triton, window_pool_triton_backward
    B, N, w, ratio, overlap, with_ape, seed = site
    kv, score, ape = inputs(B, N, w, ratio, torch.float32, with_ape, seed)
    grad = torch.randn(B, N // ratio, w // 2 if overlap else w, generator=torch.Generator().manual_seed(seed))
    cfg = dict(block_r=block_r, block_p=block_p, block_d=block_d, num_warps=1)
    torch.testing.assert_close(window_pool_triton(kv, score, ape, ratio, overlap, torch.float32, **cfg),
                               window_pool_ref(kv, score, ape, ratio, overlap, torch.float32))
    got = window_pool_triton_backward(kv, score, ape, grad, ratio, overlap, **cfg, programs=programs)
    for g, want in zip(got, window_pool_ref_backward(kv, score, ape, grad, ratio, overlap)):
        torch.testing.assert_close(g, want.to(g.dtype))


def _check_backend(backend, kv, score, ape, ratio, overlap, seed=0):
    B, N, w = kv.shape
    grad = torch.randn(B, N // ratio, w // 2 if overlap else w, generator=torch.Generator().manual_seed(seed))
    grad = grad.to(kv.device)
    out, got = grads(lambda k, s, a: pool(k, s, a, ratio, overlap, None, backend), (kv, score, ape), grad)
    want, want_grads = grads(lambda k, s, a: pool(k, s, a, ratio, overlap, None, "torch"), (kv, score, ape), grad)
    assert out.dtype == want.dtype == dsgraph.ops.window_pool.result_dtype(kv, score, ape)
    torch.testing.assert_close(out, want)
    exact = None
    for i, (g, w_) in enumerate(zip(got, want_grads)):
        assert g.dtype == w_.dtype
        if i == 2 and g.dtype == torch.float32 and N // ratio > 256:
            # dape sums one term per window: over thousands of windows fp32 summation order alone moves it
            # by more than assert_close's fp32 defaults (1.2e-5 at 4097 windows, on the H100). Bound: within
            # twice the reference's own error against float64, plus the default atol.
            if exact is None:
                _, exact = grads(lambda k, s, a: pool(k, s, a, ratio, overlap, None, "torch"),
                                 tuple(t.double() if t is not None else None for t in (kv, score, ape)), grad.double())
            own = (w_.double() - exact[2]).abs().max().item()
            assert (g.double() - exact[2]).abs().max().item() <= 2 * own + 1e-5
            continue
        torch.testing.assert_close(g, w_)


def test_window_zero_fill_gives_no_nan_and_an_all_masked_column_is_nan_as_in_eager():
    """Window 0's missing overlap slots are weight 0 (its own slots are finite). A column whose own
    scores are all -inf is NaN in eager's softmax and in every kernel."""
    kv, score, ape = inputs(1, 12, 4, 4, device="cpu")
    score[0, 4:8, 3] = float("-inf")  # window 1, plain: feature 3 all -inf
    for overlap in (False, True):
        want = eager(kv, score, ape, 4, overlap)
        for backend in ("torch", "triton"):
            got = pool(kv.to(DEVICE), score.to(DEVICE), ape.to(DEVICE), 4, overlap, None, backend).cpu()
            assert torch.equal(torch.isnan(got), torch.isnan(want)), (backend, overlap, got)
            torch.testing.assert_close(got, want, equal_nan=True)
    assert not eager(kv, score, ape, 4, True)[0, 0].isnan().any()
    assert eager(kv, score, ape, 4, False)[0, 1, 3].isnan()


def test_a_chunk_of_all_minus_inf_slots_before_finite_ones():
    """The online softmax over slot chunks (block_r < ratio) starts from a chunk with nothing finite."""
    from dsgraph.kernels.window_pool_triton import window_pool_triton, window_pool_triton_backward
    kv, score, ape = inputs(1, 16, 4, 8)
    score[:, :4] = float("-inf")  # window 0's first chunk (block_r 4): all -inf; window 1 unchanged
    grad = torch.randn(1, 2, 4, device=DEVICE)
    torch.testing.assert_close(window_pool_triton(kv, score, ape, 8, False, torch.float32, block_r=4),
                               window_pool_ref(kv, score, ape, 8, False, torch.float32))
    for g, want in zip(window_pool_triton_backward(kv, score, ape, grad, 8, False, block_r=4),
                       window_pool_ref_backward(kv, score, ape, grad, 8, False)):
        torch.testing.assert_close(g, want)


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from dsgraph.kernels import window_pool_triton as k
for dt, R, overlap, w in (("bf16", 4, True, 1024), ("fp32", 128, False, 512)):
    D = w // 2 if overlap else w
    for fn, backward, extra in ((k._fwd, False, dict(OUT="*fp32")),
                                (k._bwd, True, dict(G="*fp32", DKV="*" + dt, DS="*" + dt, DAPE="*fp32"))):
        rj, bp, bd, warps = k.config(R, D, 16384 // R, 2 if dt == "bf16" else 4, backward=backward)
        sig = dict(KV="*" + dt, S="*" + dt, APE="*fp32", **extra, P="i32", W="i32", D="i32", skb="i32", skn="i32",
                   ssb="i32", ssn="i32", **(dict(sgb="i32", per_chunk="i32") if backward else {}),
                   R="constexpr", RJ="constexpr", BP="constexpr", BD="constexpr", OVERLAP="constexpr")
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=dict(R=R, RJ=rj, BP=bp, BD=bd, OVERLAP=overlap))
        done = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
        assert done.asm["cubin"]
        assert ".local" not in done.asm["ptx"], "register spills"
        if not backward:  # the slot reductions stay in threads: no shared memory in the forward's main body
            assert done.asm["ptx"].count("bar.sync") <= 1, done.asm["ttgir"]
"""


def test_triton_kernels_compile_for_sm90():
    """The interpreter runs kernels as Python: this compiles them (PTX and cubin) as a GPU would."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def test_strided_views_and_unread_tokens():
    """kv and score as column slices of one projection (the Triton kernel reads them in place); tokens
    past P·r and the last overlap window's first half get zero gradients."""
    both = torch.randn(2, 11, 12, device=DEVICE)
    kv, score = both[..., :6], both[..., 6:]
    ape = torch.randn(4, 6, device=DEVICE)
    _check_backend("triton", kv, score, ape, 4, True)
    grad = torch.randn(2, 2, 3, device=DEVICE)
    dkv, dscore, _ = torch.ops.dsgraph.window_pool_backward(grad, kv, score, ape, 4, True, "triton")
    assert not dkv[:, 8:].any() and not dscore[:, 8:].any() and not dkv[:, 4:8, :3].any()


def test_gradcheck_in_float64():
    kv, score, ape = (t.requires_grad_() for t in inputs(2, 9, 4, 2, torch.float64, device="cpu"))
    torch.autograd.gradcheck(lambda k, s, a: pool(k, s, a, 2, True, None, "torch"), (kv, score, ape))
    torch.autograd.gradcheck(lambda k, s: pool(k, s, None, 3, False, None, "torch"), (kv, score))


def test_opcheck():
    kv, score, ape = (t.requires_grad_() for t in inputs(2, 9, 4, 2, device="cpu"))
    torch.library.opcheck(pool, (kv, score, ape, 2, True, None, "torch"))
    torch.library.opcheck(pool, (kv, score, None, 4, False, torch.bfloat16, "torch"))
    torch.library.opcheck(torch.ops.dsgraph.window_pool_backward,
                          (torch.randn(2, 4, 2), kv.detach(), score.detach(), ape.detach(), 2, True, "torch"))


def test_out_dtype_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    kv, score, ape = inputs(1, 8, 4, 4, torch.bfloat16, device="cpu")
    out = pool(kv, score, ape, 4, False, torch.float32, "torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, eager(kv.float(), score.float(), ape.float(), 4, False))
    with FakeTensorMode():
        fake = pool(torch.empty(2, 37, 16, dtype=torch.bfloat16), torch.empty(2, 37, 16), None, 4, True, None, "torch")
    assert fake.shape == (2, 9, 8) and fake.dtype == torch.float32


@pytest.mark.parametrize("call, message", [
    (lambda: (torch.randn(4, 8), torch.randn(4, 8), None, 4, False), r"kv must be \[B, N, w\], got shape \(4, 8\)"),
    (lambda: (torch.randn(1, 8, 4), torch.randn(1, 8, 5), None, 4, False), "score must have kv's shape"),
    (lambda: (torch.randn(1, 8, 4), torch.randn(1, 8, 4), None, 0, False), "ratio must be an integer >= 1, got 0"),
    (lambda: (torch.randn(1, 8, 5), torch.randn(1, 8, 5), None, 4, True), "w must be even, got 5"),
    (lambda: (torch.randn(1, 8, 4), torch.randn(1, 8, 4), torch.randn(2, 4), 4, False),
     r"ape must be \[ratio, w\] = \[4, 4\], got \(2, 4\)"),
    (lambda: (torch.ones(1, 8, 4, dtype=torch.int32), torch.randn(1, 8, 4), None, 4, False), "kv dtype must be one of"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        pool(*call(), None, "torch")


def test_unsupported_reasons():
    kv = torch.empty(1, 8, 4, dtype=torch.float64, device=DEVICE)
    assert "float64" in triton_unsupported_reason(kv, kv, None, 4, False)
    f32 = kv.float()
    assert triton_unsupported_reason(f32, f32, None, 128, False) is None
    from dsgraph.kernels.window_pool_tilelang import tilelang_unsupported_reason
    if DEVICE == "cpu":
        assert "CUDA" in tilelang_unsupported_reason(torch.empty(1, 8, 4), torch.empty(1, 8, 4), None, 4, True)


_TILELANG = pytest.mark.skipif(shutil.which("nvcc") is None or importlib.util.find_spec("tilelang") is None,
                               reason="tilelang or nvcc not installed")


@_TILELANG
def test_tilelang_kernels_compile_for_sm90a():
    """Both V4 configurations (ratio 4 overlapping, bf16; ratio 128 plain, fp32), forward and backward."""
    from dsgraph.kernels.window_pool_tilelang import compile_for_sm90a
    for config in (dict(ratio=4, overlap=True, width=1024), dict(ratio=128, overlap=False, width=512,
                                                                dtype=torch.float32)):
        built = compile_for_sm90a(**config)
        assert set(built) == {"forward", "backward"}
        assert "expf" in built["forward"].get_kernel_source()
        assert "Parts" in built["backward"].get_kernel_source()


# --- GPU: V4 sizes (S = 16384: ratio 4 overlapping over 2·512 features, ratio 128 over 512) ---------------------
def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "tilelang"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio, w, overlap", [(4, 1024, True), (128, 512, False)])
def test_gpu_matches_the_reference_at_v4_sizes(backend, dtype, ratio, w, overlap):
    _gpu()
    if backend == "tilelang" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the tilelang kernels are built for sm_90a")
    kv, score, ape = inputs(1, 16384 + 5, w, ratio, dtype, device="cuda")
    _check_backend(backend, kv, score, ape.float(), ratio, overlap)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "tilelang"])
def test_gpu_small_and_odd_shapes(backend):
    _gpu()
    if backend == "tilelang" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the tilelang kernels are built for sm_90a")
    shapes = [(2, 37, 6, 4, True), (3, 130, 40, 8, False), (1, 3, 4, 4, True), (2, 300, 200, 3, False)]
    for B, N, w, ratio, overlap in shapes:
        kv, score, ape = inputs(B, N, w, ratio, device="cuda")
        _check_backend(backend, kv, score, ape, ratio, overlap)
        _check_backend(backend, kv.half(), score.bfloat16(), None, ratio, overlap)
