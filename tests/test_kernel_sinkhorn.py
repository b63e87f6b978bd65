"""dsgraph::sinkhorn: the op (errors, autograd, fake tensors), the torch reference against DeepSeek V4's
eager loop and a float64 oracle, the Triton kernels against the reference (the interpreter on CPU),
compiled for sm_90 without a GPU, and on a GPU at V4 sizes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, strategies as st

import dsgraph.ops.sinkhorn  # noqa: F401  (registers dsgraph::sinkhorn)
from dsgraph.kernels.sinkhorn_ref import sinkhorn_ref, sinkhorn_ref_backward
from dsgraph.kernels.sinkhorn_triton import sinkhorn_triton, sinkhorn_triton_backward, triton_unsupported_reason
from dsgraph.models.deepseek_v4 import sinkhorn_normalize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter
sinkhorn = torch.ops.dsgraph.sinkhorn
EPS = [0.0, 1e-6, 1e-3, 0.5]


def row_first_loop(x, iters, eps):
    """The row-first form, written out: (row, column) normalisations ``iters`` times after softmax + eps."""
    c = x.softmax(-1) + eps
    for _ in range(iters):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def eager(x, iters, eps, row_first):
    return row_first_loop(x, iters, eps) if row_first else sinkhorn_normalize(x, iters, eps)


def autograd_of(fn, x, grad):
    leaf = x.detach().requires_grad_()
    return torch.autograd.grad(fn(leaf), leaf, grad)[0]


@st.composite
def cases(draw, ms=(1, 2, 3, 4, 5, 8), dtypes=(torch.float32,)):
    m = draw(st.sampled_from(ms))
    lead = draw(st.lists(st.integers(1, 3), max_size=3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    # logits of V4's spread (unit-scale mixes) and saturated ones (softmax rows near one-hot)
    x = torch.randn(*lead, m, m, generator=gen) * draw(st.sampled_from([0.1, 1.0, 4.0]))
    grad = torch.randn(*lead, m, m, generator=gen)
    return (x.to(draw(st.sampled_from(dtypes))), grad, draw(st.integers(1, 25)), draw(st.sampled_from(EPS)),
            draw(st.booleans()))


@given(cases())
def test_the_reference_is_the_eager_loop_and_its_autograd(case):
    x, grad, iters, eps, row_first = case
    torch.testing.assert_close(sinkhorn_ref(x, iters, eps, row_first), eager(x, iters, eps, row_first),
                               rtol=0, atol=0)
    torch.testing.assert_close(sinkhorn_ref_backward(x, grad, iters, eps, row_first),
                               autograd_of(lambda t: eager(t, iters, eps, row_first), x, grad), rtol=0, atol=0)


@given(cases(ms=(1, 2, 4, 8), dtypes=(torch.float32, torch.bfloat16, torch.float16)))
def test_triton_matches_the_reference(case):
    x, grad, iters, eps, row_first = (t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in case)
    out = sinkhorn_triton(x, iters, eps, row_first)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sinkhorn_ref(x, iters, eps, row_first))
    dx = sinkhorn_triton_backward(x, grad, iters, eps, row_first)
    assert dx.dtype == x.dtype
    torch.testing.assert_close(dx, sinkhorn_ref_backward(x, grad, iters, eps, row_first))


def test_triton_with_sixteen_streams_and_a_partial_block():
    gen = torch.Generator().manual_seed(0)
    x, grad = torch.randn(3, 16, 16, generator=gen).to(DEVICE), torch.randn(3, 16, 16, generator=gen).to(DEVICE)
    torch.testing.assert_close(sinkhorn_triton(x, 4, 1e-6), sinkhorn_ref(x, 4, 1e-6))
    torch.testing.assert_close(sinkhorn_triton_backward(x, grad, 4, 1e-6), sinkhorn_ref_backward(x, grad, 4, 1e-6))
    # 17 matrices of 4x4 in blocks of 16 (the second almost empty), one or two segments of iterations
    x, grad = torch.randn(17, 4, 4, generator=gen).to(DEVICE), torch.randn(17, 4, 4, generator=gen).to(DEVICE)
    torch.testing.assert_close(sinkhorn_triton(x, 3, 1e-6, True, block=16), sinkhorn_ref(x, 3, 1e-6, True))
    for segment in (1, 2, 7):
        torch.testing.assert_close(sinkhorn_triton_backward(x, grad, 6, 1e-6, True, block=16, segment=segment),
                                   sinkhorn_ref_backward(x, grad, 6, 1e-6, True))


def test_the_reference_backward_chunks_matrices(monkeypatch):
    monkeypatch.setattr("dsgraph.kernels.sinkhorn_ref.CHUNK_ELEMENTS", 32)  # two 4x4 matrices a chunk
    x, grad = torch.randn(5, 4, 4), torch.randn(5, 4, 4)
    torch.testing.assert_close(sinkhorn_ref_backward(x, grad, 6, 1e-6),
                               autograd_of(lambda t: sinkhorn_normalize(t, 6, 1e-6), x, grad))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("row_first", [False, True])
def test_the_op_trains_through_its_backward_like_float64_autograd(backend, row_first):
    x = torch.randn(2, 3, 4, 4, device=DEVICE, requires_grad=True)
    out = sinkhorn(x, 20, 1e-6, backend, row_first)
    grad = torch.randn_like(out)
    out.backward(grad)
    x64 = x.detach().double()
    torch.testing.assert_close(out.double(), eager(x64, 20, 1e-6, row_first), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), autograd_of(lambda t: eager(t, 20, 1e-6, row_first), x64,
                                                            grad.double()), rtol=1e-4, atol=1e-5)


def test_gradcheck_in_float64():
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: sinkhorn(t, 5, 1e-3, "torch"), (x,))
    torch.autograd.gradcheck(lambda t: sinkhorn(t, 5, 1e-3, "torch", True), (x,))


def test_low_precision_logits_give_fp32_results_and_grads_in_their_dtype():
    x = torch.randn(3, 4, 4).bfloat16().requires_grad_()
    out = sinkhorn(x, 20, 1e-6, "torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sinkhorn_normalize(x.detach().float(), 20, 1e-6), rtol=0, atol=0)
    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, grad)
    assert dx.dtype == torch.bfloat16
    torch.testing.assert_close(dx, autograd_of(lambda t: sinkhorn_normalize(t.float(), 20, 1e-6), x, grad))


def test_opcheck():
    x = torch.randn(2, 4, 4, requires_grad=True)
    torch.library.opcheck(sinkhorn, (x, 3, 1e-6, "torch"))
    torch.library.opcheck(torch.ops.dsgraph.sinkhorn_backward, (torch.randn(2, 4, 4), x.detach(), 3, 1e-6, "torch"))


def test_empty_inputs():
    x = torch.randn(0, 4, 4, requires_grad=True)
    out = sinkhorn(x, 3, 1e-6, "triton")
    assert out.shape == (0, 4, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 4, 4)


@pytest.mark.parametrize("call, message", [
    (lambda: (torch.randn(4), 3, 1e-6), r"logits must be \[..., M, M\] with M >= 1, got shape \(4,\)"),
    (lambda: (torch.randn(2, 3, 4), 3, 1e-6), r"logits must be \[..., M, M\]"),
    (lambda: (torch.ones(2, 4, 4, dtype=torch.int32), 3, 1e-6), "logits dtype must be one of"),
    (lambda: (torch.randn(2, 4, 4), 0, 1e-6), "iters must be an integer >= 1, got 0"),
    (lambda: (torch.randn(2, 4, 4), 3, -1e-6), "eps must be a finite number >= 0, got -1e-06"),
    (lambda: (torch.randn(2, 4, 4), 3, float("nan")), "eps must be a finite number >= 0"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        sinkhorn(*call(), "torch")


def test_bad_gradient_shape_is_named():
    with pytest.raises(ValueError, match=r"grad must have the logits' shape \(2, 4, 4\)"):
        torch.ops.dsgraph.sinkhorn_backward(torch.randn(4, 4), torch.randn(2, 4, 4), 3, 1e-6, "torch")


def test_fake_tensors_give_the_result_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out = sinkhorn(torch.empty(5, 8, 8, dtype=torch.float16), 20, 1e-6, "torch")
    assert out.shape == (5, 8, 8) and out.dtype == torch.float32


def test_triton_says_why_it_cannot_serve_a_site():
    assert "power of two <= 16" in triton_unsupported_reason(torch.empty(2, 3, 3, device=DEVICE), 20, 1e-6)
    assert "power of two <= 16" in triton_unsupported_reason(torch.empty(2, 32, 32, device=DEVICE), 20, 1e-6)
    assert "float64" in triton_unsupported_reason(torch.empty(2, 4, 4, dtype=torch.float64, device=DEVICE), 20, 1e-6)
    assert triton_unsupported_reason(torch.empty(2, 16, 16, device=DEVICE), 20, 1e-6) is None


_COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from dsgraph.kernels import sinkhorn_triton as k
    for m in (2, 4, 16):
        block, warps, per_thread = k._config(m, None, None)
        for row_first in (False, True):
            for fn, sig in ((k._fwd, dict(X="*bf16", OUT="*fp32", n="i32", iters="i32", eps="fp32")),
                            (k._bwd, dict(X="*fp32", G="*fp32", DX="*fp32", n="i32", iters="i32", eps="fp32",
                                          SEG="i32"))):
                sig.update(M="constexpr", BLOCK="constexpr", PER_THREAD="constexpr", ROW_FIRST="constexpr")
                src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=dict(
                    M=m, BLOCK=block, PER_THREAD=per_thread, ROW_FIRST=row_first))
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
                assert compiled.asm["cubin"]
                ptx = compiled.asm["ptx"]
                if per_thread:  # sums are in-thread adds: no shuffles, and one barrier (the store's relayout)
                    assert "shfl" not in ptx and ptx.count("bar.sync") <= 1, (fn.__name__, m)
                    # one reciprocal per row or column sum (a division per element would be 16 a step)
                    assert ptx.count("div.full.f32") <= (20 if fn is k._fwd else 52), ptx.count("div.full.f32")
""")


def test_triton_kernels_compile_for_sm90():
    """The interpreter runs kernels as Python: this compiles them (PTX and cubin) as a GPU would, and
    checks that a thread owns whole matrices where M <= 4."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


# --- GPU: V4 sizes (4096 tokens x 4 sequences, 4 streams, 20 iterations) ------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_first", [False, True])
def test_gpu_triton_matches_the_reference_at_v4_sizes(dtype, row_first):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 4096, 4, 4, device="cuda", generator=gen).to(dtype)
    grad = torch.randn(4, 4096, 4, 4, device="cuda", generator=gen)
    torch.testing.assert_close(sinkhorn_triton(x, 20, 1e-6, row_first), sinkhorn_ref(x, 20, 1e-6, row_first))
    torch.testing.assert_close(sinkhorn_triton_backward(x, grad, 20, 1e-6, row_first),
                               sinkhorn_ref_backward(x, grad, 20, 1e-6, row_first))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 8, 16])
def test_gpu_triton_matches_the_reference_for_other_stream_counts(m):
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(16384 + 3, m, m, device="cuda", generator=gen)
    grad = torch.randn(16384 + 3, m, m, device="cuda", generator=gen)
    torch.testing.assert_close(sinkhorn_triton(x, 20, 1e-6), sinkhorn_ref(x, 20, 1e-6))
    torch.testing.assert_close(sinkhorn_triton_backward(x, grad, 20, 1e-6), sinkhorn_ref_backward(x, grad, 20, 1e-6))
