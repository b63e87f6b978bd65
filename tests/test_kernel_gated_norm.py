"""dsgraph::gated_rmsnorm kernels: torch reference == a float64 eager oracle (autograd gradients);
Triton and mamba-ssm == the reference. Triton runs under TRITON_INTERPRET=1 on CPU (tiny shapes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import dsgraph.ops.gated_norm  # noqa: F401  (registers the op)
from dsgraph.kernels.gated_norm_ref import backward_atol, gated_rmsnorm_ref, gated_rmsnorm_ref_backward
from dsgraph.kernels.gated_norm_triton import (MAX_GROUP, gated_rmsnorm_triton, gated_rmsnorm_triton_backward,
                                               triton_unsupported_reason)
from dsgraph.verify import assert_equivalent

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def oracle(x, gate, weight, dout, eps, group_size):
    """float64 eager gated RMSNorm and its autograd gradients."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, gate, weight)]
    u = leaves[0] * F.silu(leaves[1]) if gate is not None else leaves[0]
    grouped = u.unflatten(-1, (-1, group_size))
    out = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * leaves[2]
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout.double())
    return out.detach(), grads


@st.composite
def cases(draw, dtypes=DTYPES, max_group=24):
    lead = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    groups, group_size = draw(st.integers(1, 3)), draw(st.integers(1, max_group))
    d = groups * group_size
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    # x and gate as the z / y slices of one wider projection half of the time: row-strided views.
    if draw(st.booleans()):
        wide = randn(*lead, 2 * d + 3).to(dtype)
        x, gate = wide[..., :d], wide[..., d + 3:]
    else:
        x, gate = randn(*lead, d).to(dtype), randn(*lead, d).to(dtype)
    gate = gate if draw(st.booleans()) else None
    weight = randn(d).to(draw(st.sampled_from([dtype, torch.float32])))
    out_dtype = draw(st.sampled_from([None, torch.float32]))
    eps = draw(st.sampled_from([1e-5, 1e-6, 0.1]))
    return x, gate, weight, randn(*lead, d), eps, group_size, out_dtype


@given(cases(dtypes=[torch.float32, torch.float64]))
def test_the_reference_is_the_eager_definition(case):
    x, gate, weight, dout, eps, group_size, _ = case
    x, weight = x.double(), weight.double()
    gate = None if gate is None else gate.double()
    want, grads = oracle(x, gate, weight, dout, eps, group_size)
    torch.testing.assert_close(gated_rmsnorm_ref(x, gate, weight, eps, group_size), want)
    got = [g for g in gated_rmsnorm_ref_backward(x, gate, weight, dout.double(), eps, group_size) if g is not None]
    for g, w in zip(got, grads):
        torch.testing.assert_close(g, w)


@given(cases())
def test_triton_matches_the_reference(case):
    x, gate, weight, dout, eps, group_size, out_dtype = case
    want = gated_rmsnorm_ref(x, gate, weight, eps, group_size, out_dtype)
    got = gated_rmsnorm_triton(x, gate, weight, eps, group_size, out_dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_equivalent(got, want, "forward")
    want_grads = gated_rmsnorm_ref_backward(x, gate, weight, dout, eps, group_size)
    got_grads = gated_rmsnorm_triton_backward(x, gate, weight, dout, eps, group_size)
    atol = backward_atol(x, gate, weight, dout, eps, group_size)
    for name, g, w in zip(("dx", "dgate", "dweight"), got_grads, want_grads):
        assert (g is None) == (w is None), name
        if g is not None:
            assert g.dtype == w.dtype, name
            _assert_grad_close(g, w, atol, name, x.numel() // x.shape[-1])


_RTOL = {torch.float32: 1.3e-6, torch.bfloat16: 1.6e-2, torch.float16: 1e-3}  # assert_close's defaults


def _assert_grad_close(got, want, atol, name, rows):
    """assert_equivalent's per-dtype tolerance (low precision scaled by the largest value), plus
    ``atol`` for dx and dgate (backward_atol: the backward's cancellation makes two fp32 computations
    differ by ulps of the cancelled terms, not of the result), and for dweight, a sum over ``rows``
    rows, sqrt(rows) ulps of its largest value (two summation orders differ by a random walk of
    roundings: 8192 rows on the GPU drifted past the flat 1e-5)."""
    rtol = _RTOL[want.dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    base = 1e-5 if want.dtype == torch.float32 else rtol * max(scale, 1e-3)
    extra = rows ** 0.5 * torch.finfo(want.dtype).eps * scale if name == "dweight" else atol
    torch.testing.assert_close(got, want, rtol=rtol, atol=base + extra,
                               msg=lambda m: f"{name}\n{m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_op_trains_through_its_backward(backend):
    x, gate = (torch.randn(3, 8, device=DEVICE, requires_grad=True) for _ in range(2))
    weight = torch.randn(8, device=DEVICE, requires_grad=True)
    out = torch.ops.dsgraph.gated_rmsnorm(x, gate, weight, 1e-5, 4, None, backend)
    dout = torch.randn_like(out)
    out.backward(dout)
    want, grads = oracle(x, gate, weight, dout, 1e-5, 4)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for t, g in zip((x, gate, weight), grads):
        torch.testing.assert_close(t.grad.double(), g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda x, w: (x, None, w, 1e-5, 3, None), "group_size must be a positive divisor of D = 8"),
    (lambda x, w: (x, x[:, :4], w, 1e-5, 4, None), "gate must have x's shape"),
    (lambda x, w: (x, None, w[:4], 1e-5, 4, None), "weight must have shape [D] = [8]"),
    (lambda x, w: (x, None, w, -1.0, 4, None), "eps must be a finite number >= 0"),
    (lambda x, w: (x.int(), None, w, 1e-5, 4, None), "x dtype must be one of"),
    (lambda x, w: (x, None, w, 1e-5, 4, torch.int8), "out_dtype dtype must be one of"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.dsgraph.gated_rmsnorm(*call(torch.randn(2, 8), torch.ones(8)), "torch")


def test_triton_says_why_it_cannot_serve_a_site():
    x = torch.empty(1, 2 * MAX_GROUP, device=DEVICE)
    assert "group_size" in triton_unsupported_reason(x, None, torch.ones(2 * MAX_GROUP, device=DEVICE), 1e-5,
                                                     2 * MAX_GROUP)
    assert "dtype" in triton_unsupported_reason(torch.zeros(2, 4, dtype=torch.float64, device=DEVICE), None,
                                                torch.ones(4, device=DEVICE), 1e-5, 4)


# --- GPU: Nemotron-sized sites (intermediate 4096, 8 groups, L 4096, bf16) --------------------------------------
def _nemotron_site(seed=0, batch=2, length=4096, d=4096, groups=8):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    # y and z as the kernels meet them: y from the scan, z a slice of in_proj's output [B, L, z | xBC | dt]
    proj = torch.randn(batch, length, d + d + 2 * groups * 128 + 64, device="cuda", generator=gen,
                       dtype=torch.bfloat16)
    z = proj[..., :d]
    y = torch.randn(batch, length, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = 1 + 0.1 * torch.randn(d, device="cuda", generator=gen)
    return y, z, weight, torch.randn(batch, length, d, device="cuda", generator=gen), d // groups


def _compare_on_gpu(forward, backward):
    y, z, weight, dout, group_size = _nemotron_site()
    for out_dtype in (torch.bfloat16, torch.float32):
        want = gated_rmsnorm_ref(y, z, weight, 1e-5, group_size, out_dtype)
        assert_equivalent(forward(y, z, weight, 1e-5, group_size, out_dtype), want, f"forward to {out_dtype}")
    want = gated_rmsnorm_ref_backward(y, z, weight, dout, 1e-5, group_size)
    got = backward(y, z, weight, dout, 1e-5, group_size)
    atol = backward_atol(y, z, weight, dout, 1e-5, group_size)
    for name, g, w in zip(("dx", "dgate", "dweight"), got, want):
        assert g.dtype == w.dtype, name
        _assert_grad_close(g, w, atol, name, y.numel() // y.shape[-1])


@pytest.mark.gpu
def test_gpu_triton_matches_the_reference_at_nemotron_sizes():
    _compare_on_gpu(gated_rmsnorm_triton, gated_rmsnorm_triton_backward)


@pytest.mark.gpu
def test_gpu_mamba_ssm_matches_the_reference_at_nemotron_sizes():
    from dsgraph.kernels.gated_norm_mamba import (gated_rmsnorm_mamba, gated_rmsnorm_mamba_backward,
                                                  mamba_unsupported_reason)
    y, z, weight, _, group_size = _nemotron_site(length=16)
    reason = mamba_unsupported_reason(y, z, weight, 1e-5, group_size)
    if reason is not None:
        pytest.skip(f"mamba-ssm backend unavailable: {reason}")
    _compare_on_gpu(gated_rmsnorm_mamba, gated_rmsnorm_mamba_backward)
