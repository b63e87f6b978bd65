"""dsgraph::attention kernels: Triton == torch reference == a naive dense eager oracle.

The Triton kernels run under TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it without CUDA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsgraph.kernels.attention_ref import attention_ref, attention_ref_backward
from dsgraph.kernels.attention_triton import (attention_triton, attention_triton_backward,
                                              triton_unsupported_reason)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    kw: dict
    topk: Optional[torch.Tensor]


@st.composite
def cases(draw, dtypes=(torch.float32, torch.bfloat16), with_topk=False, device=DEVICE):
    batch, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    seq, keys = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    dim = draw(st.sampled_from([16, 32, 48]))
    dim_v = draw(st.sampled_from([dim, 16, 48]))
    dtype = draw(st.sampled_from(dtypes))
    hq = hkv * group
    window = draw(st.integers(1, 20))
    lower, upper = draw(st.sampled_from([
        (None, None), (None, 0), (None, keys - seq), (-(window - 1), 0), (-(window - 1), None),
        (None, -window), (window - 10, window), (window, window - 5)]))  # the last: empty band
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    # q is a permuted view of [B, S, H, D] half of the time: kernels must honour its strides.
    if draw(st.booleans()):
        q = randn(batch, seq, hq, dim).to(dtype).transpose(1, 2)
    else:
        q = randn(batch, hq, seq, dim).to(dtype)
    k, v = randn(batch, hkv, keys, dim).to(dtype), randn(batch, hkv, keys, dim_v).to(dtype)
    sink = randn(hq) if draw(st.booleans()) else None
    bias_shape = draw(st.sampled_from([None, (batch, 1, 1, keys), (1, 1, seq, keys),
                                       (batch, hq, seq, keys), (keys,)]))
    bias = None
    if bias_shape is not None:  # padding-style -inf entries; some rows may end up with no key
        blocked = torch.rand(*bias_shape, generator=gen).to(device) < 0.2
        bias = randn(*bias_shape).masked_fill(blocked, -math.inf)
    topk = None
    if with_topk and draw(st.booleans()):
        topk = torch.randint(0, keys, (batch, seq, draw(st.integers(1, 6))), generator=gen).to(device)
    kw = dict(scale=dim ** -0.5, sink=sink, bias=bias, lower=lower, upper=upper)
    return Case(q, k, v, randn(batch, hq, seq, dim_v).to(dtype), kw, topk)


def naive(c: Case):
    """Dense float64 eager attention: repeated k/v, materialised mask, softmax, autograd.
    Rows with no allowed key give NaN out and, by convention, zero gradient contributions."""
    q, k, v = (t.detach().double().requires_grad_() for t in (c.q, c.k, c.v))
    sink = None if c.kw["sink"] is None else c.kw["sink"].double().requires_grad_()
    batch, hq, seq, _ = q.shape
    group, keys = hq // k.shape[1], k.shape[2]
    s = c.kw["scale"] * q @ k.repeat_interleave(group, 1).transpose(-1, -2)
    if c.kw["bias"] is not None:
        s = s + c.kw["bias"].double()
    diff = torch.arange(keys)[None, :] - torch.arange(seq)[:, None]
    allowed = torch.ones(batch, 1, seq, keys, dtype=torch.bool)
    if c.kw["lower"] is not None:
        allowed &= diff >= c.kw["lower"]
    if c.kw["upper"] is not None:
        allowed &= diff <= c.kw["upper"]
    if c.topk is not None:
        allowed &= torch.zeros(batch, seq, keys, dtype=torch.bool).scatter(-1, c.topk, True)[:, None]
    s = s.masked_fill(~allowed, -math.inf)
    if sink is not None:
        s = torch.cat([s, sink.view(1, hq, 1, 1).expand(batch, hq, seq, 1)], -1)
    empty = (s == -math.inf).all(-1, keepdim=True)  # softmax of such a row is NaN, also its gradient
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    out = (p[..., :keys] @ v.repeat_interleave(group, 1)).masked_fill(empty, math.nan)
    leaves = [q, k, v] + ([sink] if sink is not None else [])
    grads = torch.autograd.grad(out, leaves, c.dout.double())
    return out, torch.logsumexp(s, -1), grads


def assert_close(actual, expected, name, low_precision=False):
    """fp32: assert_close defaults. bf16 inputs: bf16's default rtol with an atol relative to the
    tensor's scale, since p and ds enter the tensor-core products rounded to bf16 (as in every
    flash kernel), which costs absolute, not relative, accuracy near zero."""
    if actual is None or expected is None:
        assert actual is None and expected is None, name
        return
    atol = None
    if low_precision:
        finite = expected[expected.isfinite()].float()
        atol = 1e-5 + 1e-2 * (finite.abs().max().item() if finite.numel() else 0.0)
    torch.testing.assert_close(actual, expected, equal_nan=True, atol=atol,
                               rtol=None if atol is None else 1.6e-2, msg=lambda m: f"{name}: {m}")


NAMES = ("out", "lse", "dq", "dk", "dv", "dsink")


@settings(deadline=None)
@given(cases())
def test_triton_matches_reference(c: Case):
    out, lse = attention_triton(c.q, c.k, c.v, **c.kw)
    ref_out, ref_lse = attention_ref(c.q, c.k, c.v, **c.kw)
    # Both backwards read the same (out, lse): a bf16 rounding difference in out would otherwise
    # reach dsink through delta = rowsum(dout * out), a sum with cancellation.
    grads = attention_triton_backward(c.q, c.k, c.v, ref_out, ref_lse, c.dout, **c.kw)
    ref_grads = attention_ref_backward(c.q, c.k, c.v, ref_out, ref_lse, c.dout, **c.kw)
    for name, a, e in zip(NAMES, (out, lse, *grads), (ref_out, ref_lse, *ref_grads)):
        assert_close(a, e, name, c.q.dtype != torch.float32)


@settings(deadline=None)
@given(cases(dtypes=(torch.float32,), with_topk=True, device="cpu"), st.sampled_from([1, 7, 128]))
def test_reference_matches_naive(c: Case, block_q: int):
    kw = dict(c.kw, topk=c.topk, block_q=block_q)
    out, lse = attention_ref(c.q, c.k, c.v, **kw)
    grads = attention_ref_backward(c.q, c.k, c.v, out, lse, c.dout, **kw)
    n_out, n_lse, n_grads = naive(c)
    n_grads = list(n_grads) + [None] * (4 - len(n_grads))
    for name, a, e in zip(NAMES, (out, lse, *grads), (n_out, n_lse, *n_grads)):
        assert_close(a, None if e is None else e.float(), name)


def test_row_without_keys_is_nan_with_zero_gradients():
    q, k, v, dout = (torch.randn(*s, device=DEVICE) for s in ((1, 2, 5, 16), (1, 1, 7, 16), (1, 1, 7, 16),
                                                              (1, 2, 5, 16)))
    bias = torch.zeros(1, 1, 5, 7, device=DEVICE)
    bias[..., 2, :] = -math.inf  # query row 2 sees no key
    kw = dict(scale=0.25, bias=bias, upper=0)
    for fwd, bwd in ((attention_ref, attention_ref_backward), (attention_triton, attention_triton_backward)):
        out, lse = fwd(q, k, v, **kw)
        assert out[:, :, 2].isnan().all() and (lse[:, :, 2] == -math.inf).all()
        assert out[:, :, [0, 1, 3, 4]].isfinite().all()
        dq, dk, dv, dsink = bwd(q, k, v, out, lse, dout, **kw)
        assert dsink is None and (dq[:, :, 2] == 0).all()
        assert all(g.isfinite().all() for g in (dq, dk, dv))


def test_unsupported_reasons():
    def reason(q, k, v, **kw):
        return triton_unsupported_reason(q, k, v, **{**dict(sink=None, bias=None, lower=None, upper=None,
                                                            topk=None), **kw})

    q, k = torch.randn(1, 4, 8, 32, device=DEVICE), torch.randn(1, 2, 8, 32, device=DEVICE)
    assert reason(q, k, k, upper=0, bias=torch.zeros(8, device=DEVICE)) is None
    assert reason(q, k, k, topk=torch.zeros(1, 8, 2, dtype=torch.long)) == \
        "topk index masks are not supported by the triton attention kernel"
    wide = torch.randn(1, 2, 8, 512, device=DEVICE)
    assert reason(wide, wide, wide) == "head dim 512 > 256"
    assert reason(q.double(), k.double(), k.double()).startswith("dtype float64")
    assert "dtypes differ" in reason(q, k.half(), k)
    meta = torch.empty(1, 4, 8, 32, device="meta")
    assert reason(meta, meta, meta) == "device meta not supported by the triton attention kernel"


def test_cpu_needs_interpreter(monkeypatch):
    import dsgraph.kernels.attention_triton as mod
    monkeypatch.setattr(mod, "_INTERPRET", False)
    q = torch.randn(1, 1, 4, 16)
    assert mod.triton_unsupported_reason(q, q, q, sink=None, bias=None, lower=None, upper=None,
                                         topk=None) == "device cpu needs TRITON_INTERPRET=1"


@pytest.mark.parametrize("fn", [attention_ref, attention_triton])
@pytest.mark.parametrize("shapes, kw, message", [
    (((1, 4, 8, 32), (1, 3, 8, 32), (1, 3, 8, 32)), {}, "multiple of kv heads"),
    (((1, 4, 8, 32), (1, 2, 8, 16), (1, 2, 8, 32)), {}, "head dims differ"),
    (((1, 4, 8, 32), (1, 2, 8, 32), (1, 2, 9, 32)), {}, "must agree on Hkv and T"),
    (((1, 4, 8, 32), (1, 2, 8, 32), (1, 2, 8, 32)), {"sink": torch.zeros(2)}, "sink must have shape"),
    (((1, 4, 8, 32), (1, 2, 8, 32), (1, 2, 8, 32)), {"bias": torch.zeros(1, 1, 8, 5)}, "must broadcast"),
    (((4, 8, 32), (1, 2, 8, 32), (1, 2, 8, 32)), {}, "4-d"),
])
def test_bad_input_errors(fn, shapes, kw, message):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        fn(q, k, v, scale=1.0, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("lower, upper, with_sink", [(None, 0, False), (-255, 0, True), (None, None, True)])
def test_triton_gpu_bf16(lower, upper, with_sink):
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, hq, hkv, seq, dim = 2, 8, 2, 1000, 128

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    q, k, v, dout = randn(batch, hq, seq, dim), randn(batch, hkv, seq, dim), randn(batch, hkv, seq, dim), \
        randn(batch, hq, seq, dim)
    kw = dict(scale=dim ** -0.5, lower=lower, upper=upper,
              sink=torch.randn(hq, device="cuda", generator=gen) if with_sink else None)
    out, lse = attention_triton(q, k, v, **kw)
    ref_out, ref_lse = attention_ref(q, k, v, **kw)
    grads = attention_triton_backward(q, k, v, ref_out, ref_lse, dout, **kw)
    ref_grads = attention_ref_backward(q, k, v, ref_out, ref_lse, dout, **kw)
    for name, a, e in zip(NAMES, (out, lse, *grads), (ref_out, ref_lse, *ref_grads)):
        assert_close(a, e, name, low_precision=True)
