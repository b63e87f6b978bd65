"""dsgraph::indexer_scores / indexer_topk kernels: Triton == torch reference == a dense eager oracle.

The Triton kernels run under TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it without CUDA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dsgraph.ops.indexer  # noqa: F401  (registers the ops)
from dsgraph.kernels.indexer_ref import indexer_scores_ref, indexer_scores_ref_backward, indexer_topk_ref
from dsgraph.kernels.indexer_triton import (indexer_scores_triton, indexer_scores_triton_backward,
                                            indexer_topk_triton, triton_unsupported_reason)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    weights: torch.Tensor
    dscores: torch.Tensor
    kw: dict
    topk: int


@st.composite
def cases(draw, dtypes=(torch.float32, torch.bfloat16), device=DEVICE, max_seq=40):
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    seq, keys = draw(st.integers(1, max_seq)), draw(st.integers(1, max_seq))
    dim = draw(st.sampled_from([16, 24, 32]))
    dtype = draw(st.sampled_from(dtypes))
    window = draw(st.integers(1, 20))
    lower, upper = draw(st.sampled_from([
        (None, None), (None, 0), (None, keys - seq), (-(window - 1), 0), (None, -window),
        (window, window - 5)]))  # the last: empty band
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    # q is a permuted view of [B, H, S, D] half of the time: kernels must honour its strides.
    if draw(st.booleans()):
        q = randn(batch, heads, seq, dim).to(dtype).transpose(1, 2)
    else:
        q = randn(batch, seq, heads, dim).to(dtype)
    bias_shape = draw(st.sampled_from([None, (batch, 1, keys), (1, seq, keys), (batch, seq, keys), (keys,)]))
    bias = None
    if bias_shape is not None:  # padding-style -inf entries
        blocked = torch.rand(*bias_shape, generator=gen).to(device) < 0.2
        bias = randn(*bias_shape).masked_fill(blocked, -math.inf)
    kw = dict(bias=bias, lower=lower, upper=upper)
    topk = draw(st.integers(0, keys))
    return Case(q, randn(batch, keys, dim).to(dtype), randn(batch, seq, heads), randn(batch, seq, keys), kw, topk)


def naive(c: Case):
    """Dense float64 eager scores [B, S, H, T] -> [B, S, T], masked, and their autograd gradients
    with the cotangent zeroed outside the band (where the op's output is the constant -inf)."""
    q, k, w = (t.detach().double().requires_grad_() for t in (c.q, c.k, c.weights))
    s = (w[..., None] * torch.relu(torch.einsum("bshd,btd->bsht", q, k))).sum(2)
    if c.kw["bias"] is not None:
        s = s + c.kw["bias"].double()
    seq, keys = s.shape[1:]
    diff = torch.arange(keys)[None, :] - torch.arange(seq)[:, None]
    allowed = torch.ones(seq, keys, dtype=torch.bool)
    if c.kw["lower"] is not None:
        allowed &= diff >= c.kw["lower"]
    if c.kw["upper"] is not None:
        allowed &= diff <= c.kw["upper"]
    grads = torch.autograd.grad(s, (q, k, w), c.dscores.double().cpu().masked_fill(~allowed, 0.0))
    return s.detach().masked_fill(~allowed, -math.inf), grads


def assert_close(actual, expected, name, low_precision=False):
    """fp32: assert_close defaults. bf16 inputs: bf16's rtol with an atol relative to the tensor's
    scale, since the relu-gradient tile enters the backward products rounded to bf16 (as in flash
    kernels), which costs absolute, not relative, accuracy near zero."""
    atol = None
    if low_precision:
        finite = expected[expected.isfinite()].float()
        atol = 1e-5 + 1e-2 * (finite.abs().max().item() if finite.numel() else 0.0)
    torch.testing.assert_close(actual, expected.to(actual.dtype), equal_nan=True, atol=atol,
                               rtol=None if atol is None else 1.6e-2, msg=lambda m: f"{name}: {m}")


def assert_topk_matches(values, indices, scores, k, low_precision=False):
    """The tie rule of dsgraph::indexer_topk: the selected values equal torch.topk's, and the indices
    are distinct positions holding those values (among equal or near-equal scores any may be chosen)."""
    expected, _ = torch.topk(scores, k, dim=-1)
    assert values.shape == expected.shape and indices.dtype == torch.int64
    assert_close(values, expected, "top-k values", low_precision)
    assert_close(scores.gather(-1, indices), values, "scores at the top-k indices", low_precision)
    if k:
        ordered = indices.sort(-1).values
        assert (ordered[..., 1:] != ordered[..., :-1]).all(), "repeated top-k index"


@settings(deadline=None)
@given(cases())
def test_triton_matches_reference(c: Case):
    low = c.q.dtype != torch.float32
    ref = indexer_scores_ref(c.q, c.k, c.weights, **c.kw)
    assert_close(indexer_scores_triton(c.q, c.k, c.weights, **c.kw), ref, "scores", low)
    band = dict(lower=c.kw["lower"], upper=c.kw["upper"])
    grads = indexer_scores_triton_backward(c.q, c.k, c.weights, c.dscores, **band)
    ref_grads = indexer_scores_ref_backward(c.q, c.k, c.weights, c.dscores, **band)
    for name, a, e in zip(("dq", "dk", "dweights"), grads, ref_grads):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_close(a, e, name, low)
    values, indices = indexer_topk_triton(c.q, c.k, c.weights, topk=c.topk, **c.kw)
    assert_topk_matches(values, indices, ref, c.topk, low)


@settings(deadline=None)
@given(cases(dtypes=(torch.float32,), device="cpu"), st.sampled_from([1, 7, 64]))
def test_reference_matches_naive(c: Case, block_q: int):
    scores = indexer_scores_ref(c.q, c.k, c.weights, block_q=block_q, **c.kw)
    grads = indexer_scores_ref_backward(c.q, c.k, c.weights, c.dscores, block_q=block_q,
                                        lower=c.kw["lower"], upper=c.kw["upper"])
    n_scores, n_grads = naive(c)
    assert_close(scores, n_scores, "scores")
    for name, a, e in zip(("dq", "dk", "dweights"), grads, n_grads):
        assert_close(a, e, name)
    values, indices = indexer_topk_ref(c.q, c.k, c.weights, topk=c.topk, block_q=block_q, **c.kw)
    assert_topk_matches(values, indices, scores, c.topk)


def test_ops_dispatch_to_the_chosen_backend_and_differentiate():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 2, 16, generator=gen, requires_grad=True)
    k = torch.randn(1, 11, 16, generator=gen, requires_grad=True)
    w = torch.randn(1, 9, 2, generator=gen, requires_grad=True)
    results = {}
    for backend in ("torch", "triton"):
        scores = torch.ops.dsgraph.indexer_scores(q, k, w, None, None, 2, backend)
        grads = torch.autograd.grad(scores.masked_fill(scores.isinf(), 0).sum(), (q, k, w))
        values, indices = torch.ops.dsgraph.indexer_topk(q, k, w, None, None, 2, 5, backend)
        assert not values.requires_grad and not indices.requires_grad  # documented non-differentiable
        results[backend] = (scores, *grads, values)
    for name, a, e in zip(("scores", "dq", "dk", "dweights", "values"), results["triton"], results["torch"]):
        assert_close(a, e, name)


def test_unsupported_reasons():
    q, k, w = torch.randn(1, 8, 2, 32), torch.randn(1, 8, 32), torch.randn(1, 8, 2)
    assert triton_unsupported_reason(q, k, w) is None
    assert triton_unsupported_reason(q.double(), k, w).startswith("q dtype float64")
    assert triton_unsupported_reason(q, k, w.double()).startswith("weights dtype float64")
    assert triton_unsupported_reason(torch.randn(1, 8, 2, 512), torch.randn(1, 8, 512), w) == "head dim 512 > 256"
    meta = torch.empty(1, 8, 2, 32, device="meta")
    assert triton_unsupported_reason(meta, k.to("meta"), w.to("meta")) == \
        "device meta not supported by the triton indexer kernels"


def test_cpu_needs_interpreter(monkeypatch):
    import dsgraph.kernels.indexer_triton as mod
    monkeypatch.setattr(mod, "_INTERPRET", False)
    q = torch.randn(1, 4, 1, 16)
    assert mod.triton_unsupported_reason(q, q[:, :, 0], q[..., 0]) == "device cpu needs TRITON_INTERPRET=1"


@pytest.mark.parametrize("fn", [indexer_scores_ref, indexer_scores_triton])
@pytest.mark.parametrize("shapes, kw, message", [
    (((1, 4, 2, 32), (1, 8, 16), (1, 4, 2)), {}, r"must have B=1 and D=32"),
    (((1, 4, 2, 32), (1, 8, 32), (1, 4, 3)), {}, r"weights must be \[B, S, H\]"),
    (((4, 2, 32), (1, 8, 32), (1, 4, 2)), {}, r"q must be \[B, S, H, D\]"),
    (((1, 4, 2, 32), (1, 8, 32), (1, 4, 2)), {"bias": torch.zeros(1, 4, 5)}, "must broadcast to"),
])
def test_bad_input_errors(fn, shapes, kw, message):
    q, k, w = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        fn(q, k, w, **kw)


@pytest.mark.parametrize("fn", [indexer_topk_ref, indexer_topk_triton])
def test_topk_larger_than_keys_is_an_error(fn):
    q, k, w = torch.randn(1, 4, 2, 16), torch.randn(1, 8, 16), torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match=r"topk must be in \[0, T\] = \[0, 8\]; got 9"):
        fn(q, k, w, topk=9)


@pytest.mark.gpu
@pytest.mark.parametrize("lower, upper, padding", [(None, 0, False), (None, 0, True), (None, None, False)])
def test_triton_gpu_bf16(lower, upper, padding):
    """V3.2's indexer at a realistic size: 64 heads of 128, S = T = 1024, top-256."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, seq, heads, dim, topk = 1, 1024, 64, 128, 256

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)

    q, k = randn(batch, seq, heads, dim), randn(batch, seq, dim)
    w = randn(batch, seq, heads, dtype=torch.float32) * (heads ** -0.5 * dim ** -0.5)
    bias = None
    if padding:
        bias = torch.zeros(batch, 1, seq, device="cuda")
        bias[..., :100] = torch.finfo(torch.float32).min
    kw = dict(bias=bias, lower=lower, upper=upper)
    ref = indexer_scores_ref(q, k, w, **kw)
    assert_close(indexer_scores_triton(q, k, w, **kw), ref, "scores", low_precision=True)
    dscores = randn(batch, seq, seq, dtype=torch.float32)
    grads = indexer_scores_triton_backward(q, k, w, dscores, lower=lower, upper=upper)
    ref_grads = indexer_scores_ref_backward(q, k, w, dscores, lower=lower, upper=upper)
    for name, a, e in zip(("dq", "dk", "dweights"), grads, ref_grads):
        assert_close(a, e, name, low_precision=True)
    values, indices = indexer_topk_triton(q, k, w, topk=topk, **kw)
    assert_topk_matches(values, indices, ref, topk, low_precision=True)
