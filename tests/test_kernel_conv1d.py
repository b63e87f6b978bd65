"""dsgraph::causal_conv1d kernels: torch reference == a float64 eager ``F.conv1d`` oracle (autograd
gradients); Triton == the reference. Likewise dsgraph::causal_conv1d_update (decode: the conv of
cat([state, x]) and the shifted state). Triton runs under TRITON_INTERPRET=1 on CPU (tiny shapes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import dsgraph.ops.conv1d  # noqa: F401  (registers the op)
from dsgraph.kernels.conv1d_ref import causal_conv1d_ref, causal_conv1d_ref_backward, causal_conv1d_update_ref
from dsgraph.kernels.conv1d_triton import (MAX_K, causal_conv1d_triton, causal_conv1d_triton_backward,
                                           causal_conv1d_update_triton, triton_unsupported_reason,
                                           update_unsupported_reason)
from dsgraph.verify import assert_equivalent

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def oracle(x, weight, bias, activation, dout):
    """float64 nn.Conv1d-style causal conv (padding K - 1, cropped) and its autograd gradients."""
    x, weight = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    bias = None if bias is None else bias.detach().double().requires_grad_()
    k, length = weight.shape[1], x.shape[1]
    out = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=k - 1, groups=x.shape[2])[..., :length]
    out = out.transpose(1, 2)
    out = F.silu(out) if activation == "silu" else out
    grads = torch.autograd.grad(out, [t for t in (x, weight, bias) if t is not None], dout.double())
    return out.detach(), grads


@st.composite
def cases(draw, dtypes=DTYPES, max_len=20, max_channels=40):
    batch, length, channels = draw(st.integers(1, 2)), draw(st.integers(1, max_len)), draw(st.integers(1, max_channels))
    k = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    layout = draw(st.sampled_from(["contiguous", "transposed", "slice"]))
    if layout == "transposed":  # the [B, C, L] tensor eager code conv'd, seen as [B, L, C]
        x = randn(batch, channels, length).to(dtype).transpose(1, 2)
    elif layout == "slice":  # the xBC slice of a wider in_proj output
        x = randn(batch, length, channels + 7).to(dtype)[..., 3:3 + channels]
    else:
        x = randn(batch, length, channels).to(dtype)
    bias = randn(channels).to(dtype) if draw(st.booleans()) else None
    activation = draw(st.sampled_from([None, "silu"]))
    return x, randn(channels, k).to(dtype), bias, activation, randn(batch, length, channels)


@given(cases(dtypes=[torch.float32, torch.float64]))
def test_the_reference_is_eager_conv1d(case):
    x, weight, bias, activation, dout = case
    x, weight, bias = (None if t is None else t.double() for t in (x, weight, bias))
    want, grads = oracle(x, weight, bias, activation, dout)
    torch.testing.assert_close(causal_conv1d_ref(x, weight, bias, activation), want)
    got = [g for g in causal_conv1d_ref_backward(x, weight, bias, activation, dout.double()) if g is not None]
    for g, w in zip(got, grads):
        torch.testing.assert_close(g, w)


@given(cases())
def test_triton_matches_the_reference(case):
    x, weight, bias, activation, dout = case
    want = causal_conv1d_ref(x, weight, bias, activation)
    got = causal_conv1d_triton(x, weight, bias, activation)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_equivalent(got, want, "forward")
    want_grads = causal_conv1d_ref_backward(x, weight, bias, activation, dout)
    got_grads = causal_conv1d_triton_backward(x, weight, bias, activation, dout)
    for name, g, w in zip(("dx", "dweight", "dbias"), got_grads, want_grads):
        assert (g is None) == (w is None), name
        if g is not None:
            assert g.dtype == w.dtype and g.shape == w.shape, name
            assert_equivalent(g, w, name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_op_trains_through_its_backward(backend):
    x = torch.randn(2, 11, 20, device=DEVICE, requires_grad=True)
    weight = torch.randn(20, 4, device=DEVICE, requires_grad=True)
    bias = torch.randn(20, device=DEVICE, requires_grad=True)
    out = torch.ops.dsgraph.causal_conv1d(x, weight, bias, "silu", backend)
    dout = torch.randn_like(out)
    out.backward(dout)
    want, grads = oracle(x, weight, bias, "silu", dout)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for t, g in zip((x, weight, bias), grads):
        torch.testing.assert_close(t.grad.double(), g, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda x, w, b: (x[0], w, b, None), "x must be [B, L, C]"),
    (lambda x, w, b: (x, w[:3], b, None), "weight must be [C, K] = [4, K >= 1]"),
    (lambda x, w, b: (x, w, b[:2], None), "bias must be None or [C] = [4]"),
    (lambda x, w, b: (x, w, b, "gelu"), "activation must be one of"),
    (lambda x, w, b: (x.int(), w, b, None), "x dtype must be one of"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.dsgraph.causal_conv1d(*call(torch.randn(2, 5, 4), torch.randn(4, 3), torch.randn(4)), "torch")


def test_triton_says_why_it_cannot_serve_a_site():
    x = torch.zeros(1, 4, 3, device=DEVICE)
    assert "kernel width" in triton_unsupported_reason(x, torch.zeros(3, MAX_K + 1, device=DEVICE))
    assert "dtype" in triton_unsupported_reason(x.double(), torch.zeros(3, 4, dtype=torch.float64, device=DEVICE))


# --- causal_conv1d_update (decode) ---------------------------------------------------------------------------------
def update_oracle(x, state, weight, bias, activation):
    """The eager decode step in float64 after the window's rounding to x's dtype: (out, new state)."""
    window = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)
    out = F.conv1d(window.double(), weight.double()[:, None], None if bias is None else bias.double(),
                   groups=x.shape[2]).transpose(1, 2)
    return F.silu(out) if activation == "silu" else out, window[..., x.shape[1]:]


@st.composite
def update_cases(draw, dtypes=DTYPES):
    batch, length, channels, k = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 40)), \
        draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(dtypes))
    state_dtype = draw(st.sampled_from([dtype, torch.float32]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    if draw(st.booleans()):  # the xBC slice of a wider in_proj output
        x = randn(batch, length, channels + 7).to(dtype)[..., 3:3 + channels]
    else:
        x = randn(batch, length, channels).to(dtype)
    # a state written [B, C, K - 1] or seen through a transpose
    state = randn(batch, channels, k - 1) if draw(st.booleans()) else randn(batch, k - 1, channels).transpose(1, 2)
    bias = randn(channels).to(dtype) if draw(st.booleans()) else None
    return x, state.to(state_dtype), randn(channels, k).to(dtype), bias, draw(st.sampled_from([None, "silu"]))


@given(update_cases(dtypes=[torch.float32, torch.float64, torch.bfloat16]))
def test_the_update_reference_is_the_eager_decode_step(case):
    x, state, weight, bias, activation = case
    want_out, want_state = update_oracle(x, state, weight, bias, activation)
    out, new_state = causal_conv1d_update_ref(x, state, weight, bias, activation)
    assert out.dtype == x.dtype and new_state.dtype == x.dtype and new_state.is_contiguous()
    assert torch.equal(new_state, want_state)
    # fp32 math rounded once to x's dtype (fp64 for fp64)
    torch.testing.assert_close(out, want_out.to(x.dtype))


@given(update_cases())
def test_triton_update_matches_the_reference(case):
    x, state, weight, bias, activation = case
    want_out, want_state = causal_conv1d_update_ref(x, state, weight, bias, activation)
    out, new_state = causal_conv1d_update_triton(x, state, weight, bias, activation)
    assert out.dtype == want_out.dtype and out.shape == want_out.shape
    assert new_state.dtype == want_state.dtype and torch.equal(new_state, want_state)  # bit for bit
    assert_equivalent(out, want_out, "out")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_update_op_dispatches_to_its_backend(backend):
    x, state = torch.randn(2, 1, 20, device=DEVICE), torch.randn(2, 20, 3, device=DEVICE)
    weight, bias = torch.randn(20, 4, device=DEVICE), torch.randn(20, device=DEVICE)
    out, new_state = torch.ops.dsgraph.causal_conv1d_update(x, state, weight, bias, "silu", backend)
    want_out, want_state = update_oracle(x, state, weight, bias, "silu")
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(new_state, want_state)


@pytest.mark.parametrize("call, message", [
    (lambda x, s, w: (x[:, :0], s, w), "x must be [B, L >= 1, C]"),
    (lambda x, s, w: (x, s[..., :2], w), "conv_state must be [B, C, K - 1] = [2, 4, 3]"),
    (lambda x, s, w: (x, s[:1], w), "conv_state must be [B, C, K - 1] = [2, 4, 3]"),
    (lambda x, s, w: (x, s.int(), w), "conv_state dtype must be one of"),
    (lambda x, s, w: (x, s, w[:3]), "weight must be [C, K] = [4, K >= 1]"),
])
def test_bad_update_arguments_are_named(call, message):
    x, state, weight = call(torch.randn(2, 1, 4), torch.randn(2, 4, 3), torch.randn(4, 4))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.dsgraph.causal_conv1d_update(x, state, weight, None, None, "torch")


def test_triton_says_why_it_cannot_serve_an_update():
    x, weight = torch.zeros(1, 1, 3, device=DEVICE), torch.zeros(3, 4, device=DEVICE)
    assert "conv_state dtype" in update_unsupported_reason(x, torch.zeros(1, 3, 3, dtype=torch.float64, device=DEVICE),
                                                           weight)
    assert "kernel width" in update_unsupported_reason(x, torch.zeros(1, 3, MAX_K, device=DEVICE),
                                                       torch.zeros(3, MAX_K + 1, device=DEVICE))
    assert update_unsupported_reason(x, torch.zeros(1, 3, 3, device=DEVICE), weight) is None


# --- GPU: Nemotron-sized sites (conv_dim 4096 + 2*8*128, K 4, L 4096, bf16) --------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["silu", None])
def test_gpu_triton_matches_the_reference_at_nemotron_sizes(activation):
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, length, d, conv_dim = 2, 4096, 4096, 4096 + 2 * 8 * 128
    proj = torch.randn(batch, length, d + conv_dim + 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    x = proj[..., d:d + conv_dim]  # xBC, read in place from in_proj's output
    weight = 0.5 * torch.randn(conv_dim, 4, device="cuda", generator=gen, dtype=torch.bfloat16)
    bias = torch.randn(conv_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    dout = torch.randn(batch, length, conv_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    assert_equivalent(causal_conv1d_triton(x, weight, bias, activation), causal_conv1d_ref(x, weight, bias, activation),
                      "forward")
    got = causal_conv1d_triton_backward(x, weight, bias, activation, dout)
    want = causal_conv1d_ref_backward(x, weight, bias, activation, dout)
    for name, g, w in zip(("dx", "dweight", "dbias"), got, want):
        assert g.dtype == w.dtype, name
        assert_equivalent(g, w, name)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32])
def test_gpu_triton_update_matches_the_reference_at_nemotron_decode_sizes(state_dtype):
    """Decode: B = 32 rows of one token, conv_dim 8192 + 2*8*128, K 4, bf16 xBC read in place from
    in_proj's output; the new state bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, d, conv_dim = 32, 8192, 8192 + 2 * 8 * 128
    proj = torch.randn(batch, 1, d + conv_dim + 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    x = proj[..., d:d + conv_dim]
    state = torch.randn(batch, conv_dim, 3, device="cuda", generator=gen).to(state_dtype)
    weight = 0.5 * torch.randn(conv_dim, 4, device="cuda", generator=gen, dtype=torch.bfloat16)
    bias = torch.randn(conv_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    for activation in ("silu", None):
        out, new_state = causal_conv1d_update_triton(x, state, weight, bias, activation)
        want_out, want_state = causal_conv1d_update_ref(x, state, weight, bias, activation)
        assert torch.equal(new_state, want_state) and new_state.dtype == torch.bfloat16
        assert_equivalent(out, want_out, "out")
