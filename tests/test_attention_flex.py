"""The ``flex`` backend of ``dsgraph::attention`` (PyTorch's FlexAttention) against the torch reference.

On CPU: the band's block mask tile by tile, the sink correction and its gradients (on the
reference's differentiable out/lse, the same function the flex path applies), flex's eager
forward, and the attention pass emitting the flex path. FlexAttention's compiled kernels and its
backward need CUDA: those tests are marked ``gpu``.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dsgraph
from dsgraph import registry
from dsgraph.kernels.attention_flex import (attention_flex, band_block_mask, flex_unsupported_reason,
                                            sink_correction)
from dsgraph.kernels.attention_ref import attention_ref, attention_ref_backward
from dsgraph.testing import rewrite

# Flex's eager (unfused) path is what runs on CPU here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@st.composite
def sites(draw, max_seq=300):
    """Bands incl. a window of 1 and windows longer than S, S not a multiple of the block,
    GQA ratios 1/4/8, sink logits up to ±30."""
    seq = draw(st.one_of(st.integers(1, 40), st.integers(100, max_seq)))
    keys = draw(st.sampled_from([seq, seq, draw(st.integers(1, max_seq))]))
    window = draw(st.sampled_from([1, 2, 7, max(1, seq // 2), seq + 5, 4 * max_seq]))
    lower, upper = draw(st.sampled_from([(None, None), (None, 0), (-(window - 1), 0), (None, keys - seq),
                                         (-(window - 1), keys - seq), (-window, window)]))
    group = draw(st.sampled_from([1, 4, 8]))
    sink = draw(st.sampled_from([None, "randn", 30.0, -30.0]))
    return dict(seq=seq, keys=keys, lower=lower, upper=upper, group=group, hkv=draw(st.integers(1, 2)),
                sink=sink, seed=draw(st.integers(0, 2**31 - 1)))


def _tensors(site, dtype=torch.float32, device="cpu", dim=16, dim_v=16):
    gen = torch.Generator().manual_seed(site["seed"])
    hkv, hq = site["hkv"], site["hkv"] * site["group"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    q, k, v = randn(1, hq, site["seq"], dim), randn(1, hkv, site["keys"], dim), randn(1, hkv, site["keys"], dim_v)
    sink = site["sink"]
    if sink == "randn":
        sink = randn(hq).float()
    elif sink is not None:  # ±30 on half the heads: the sink dominates or vanishes
        sink = torch.where(torch.arange(hq) % 2 == 0, sink, 0.0).to(device)
    return q, k, v, sink


def _has_key(site) -> bool:
    """Every query row sees at least one key (else the reference is NaN and flex 0 without a sink)."""
    lower, upper = site["lower"], site["upper"]
    rows = torch.arange(site["seq"])
    lo = rows + (lower if lower is not None else -site["seq"])
    hi = rows + (upper if upper is not None else site["keys"])
    return bool(((hi >= 0) & (lo <= site["keys"] - 1) & (lo <= hi)).all())


@given(seq=st.integers(1, 70), keys=st.integers(1, 70), block=st.sampled_from([1, 4, 8, 16]),
       lower=st.one_of(st.none(), st.integers(-80, 80)), width=st.one_of(st.none(), st.integers(0, 90)))
def test_band_block_mask_matches_the_dense_band_tile_by_tile(seq, keys, block, lower, width):
    upper = None if width is None else (lower or 0) + width
    bm = band_block_mask(seq, keys, lower, upper, "cpu", block=block)
    i, j = torch.arange(seq)[:, None], torch.arange(keys)[None, :]
    allowed = torch.ones(seq, keys, dtype=torch.bool)
    if lower is not None:
        allowed &= j - i >= lower
    if upper is not None:
        allowed &= j - i <= upper
    nq, nk = -(-seq // block), -(-keys // block)
    padded = torch.zeros(nq * block, nk * block, dtype=torch.bool)  # outside the sequence: not allowed
    padded[:seq, :keys] = allowed
    tiles = padded.view(nq, block, nk, block).transpose(1, 2)
    any_in, all_in = tiles.any((-1, -2)), tiles.all((-1, -2))

    def listed(num, idx):
        flags = torch.zeros(nq, nk, dtype=torch.bool)
        for row in range(nq):
            flags[row, idx[0, 0, row, :num[0, 0, row]].long()] = True
        return flags
    full = listed(bm.full_kv_num_blocks, bm.full_kv_indices)
    partial = listed(bm.kv_num_blocks, bm.kv_indices)
    assert torch.equal(full, all_in)  # no mask call where every position is allowed
    assert torch.equal(partial, any_in & ~all_in)  # masked tiles: exactly the mixed ones
    assert bm.seq_lengths == (seq, keys)
    ii, jj = torch.meshgrid(torch.arange(seq), torch.arange(keys), indexing="ij")
    assert torch.equal(bm.mask_mod(0, 0, ii, jj), allowed)


@given(sites(max_seq=140))
def test_sink_correction_and_its_gradients_match_the_reference(site):
    """softmax over [scores, sink] == softmax(scores) · sigmoid(lse − sink), forward and backward
    (dq, dk, dv, dsink), on the reference's own out/lse without the sink."""
    q, k, v, sink = _tensors(site)
    if sink is None:
        sink = torch.zeros(q.shape[1])
    if not _has_key(site):  # a row without keys: the reference's lse is -inf, its out NaN
        return
    band = dict(scale=0.3, lower=site["lower"], upper=site["upper"])
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, sink)]
    out0, lse0 = attention_ref(*leaves[:3], **band)
    out, lse = sink_correction(out0, lse0, leaves[3])
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)

    ref_out, ref_lse = attention_ref(q, k, v, sink=sink, **band)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    expected = attention_ref_backward(q, k, v, ref_out, ref_lse, dout, sink=sink, **band)
    for got, want in zip(grads, expected):
        # dk, dv, dsink sum up to S·G fp32 terms, here in autograd's order, there in the reference
        # backward's: a few ulps of the sum's magnitude (~10) apart.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@given(sites())
def test_flex_eager_forward_matches_the_reference(site):
    q, k, v, sink = _tensors(site)
    if sink is None and not _has_key(site):
        return  # rows without keys: NaN in the reference, 0 in flex (README: such rows may differ)
    band = dict(lower=site["lower"], upper=site["upper"])
    out = attention_flex(q, k, v, sink, 0.25, **band)
    expected, _ = attention_ref(q, k, v, scale=0.25, sink=sink, **band)
    torch.testing.assert_close(out, expected)


def window_sink(window: int):
    def attention(q, k, v, sinks):
        """gpt-oss style: repeat_kv, an additive band mask from triu/tril, a sink column, fp32 softmax."""
        seq, group = q.shape[2], q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        full = torch.full((seq, seq), float("-inf"), device=q.device)
        scores = scores + full.triu(1) + full.tril(-window)
        scores = torch.cat([scores, sinks.float().view(1, -1, 1, 1).expand(q.shape[0], -1, seq, 1)], -1)
        return torch.softmax(scores, -1)[..., :-1].to(v.dtype) @ v
    return attention


def test_flex_is_not_offered_on_cpu():
    q = torch.randn(1, 4, 32, 16)
    assert "cuda" in flex_unsupported_reason(q, q, q, scale=1.0)
    _, report = rewrite(window_sink(8), (q, q[:, :1], q[:, :1], torch.zeros(4)), policy="auto;attention=flex,torch")
    assert [r.backend for r in report.rewrites if r.op == "attention"] == ["torch"]
    assert "flex: device cpu" in str(report)


def test_pass_emits_flex(monkeypatch):
    """The attention pass emits ``attention_flex`` for backend flex (its eager forward runs on CPU,
    so the device check is lifted here)."""
    impl = registry.kernel("attention", "flex")
    monkeypatch.setitem(registry._KERNELS["attention"], "flex", dataclasses.replace(
        impl, unsupported=lambda q, k, v, **kw: None if kw.get("bias") is None and kw.get("topk") is None else "x"))
    torch.manual_seed(0)
    args = (torch.randn(1, 8, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(8) * 3)
    gm, report = rewrite(window_sink(8), args, policy="auto;attention=flex", verify=True)
    (site,) = [r for r in report.rewrites if r.op == "attention"]
    assert site.backend == "flex" and site.verified, report
    assert any(n.target is attention_flex for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*args), window_sink(8)(*args))


# --- GPU: the compiled kernels, forward and backward ------------------------------------------

GPU_SITES = [  # (seq, keys, lower, upper, group, sink, dim, dim_v)
    (1000, 1000, -255, 0, 4, "randn", 128, 128),   # window + sink, S not a multiple of 128
    (300, 300, -999, 0, 8, 30.0, 64, 64),          # window longer than S, sink +30
    (257, 257, 0, 0, 1, -30.0, 64, 64),            # window of 1, sink -30
    (512, 512, None, 0, 4, None, 128, 128),        # causal
    (384, 384, -127, 0, 8, "randn", 192, 128),     # MLA's non-absorbed head dims
]


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", [(c, torch.bfloat16) for c in GPU_SITES]
                         + [(c, torch.float32) for c in GPU_SITES[:2]])  # each is a compile: few fp32
def test_compiled_flex_forward_backward_match_the_reference_gpu(case, dtype):
    seq, keys, lower, upper, group, sink, dim, dim_v = case
    site = dict(seq=seq, keys=keys, lower=lower, upper=upper, group=group, hkv=2, sink=sink, seed=0)
    q, k, v, sink = _tensors(site, dtype=dtype, device="cuda", dim=dim, dim_v=dim_v)
    assert flex_unsupported_reason(q, k, v, scale=0.1, sink=sink, lower=lower, upper=upper) is None
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v) + ((sink,) if sink is not None else ())]
    compiled = torch.compile(attention_flex, dynamic=False, fullgraph=True)  # as the pass's graph runs it
    out = compiled(*leaves[:3], leaves[3] if sink is not None else None, 0.1, lower, upper)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    band = dict(scale=0.1, sink=sink, lower=lower, upper=upper)
    ref_out, ref_lse = attention_ref(q, k, v, **band)
    expected = attention_ref_backward(q, k, v, ref_out, ref_lse, dout, **band)
    if dtype == torch.float32:  # flex's other summation order only
        torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=2e-4)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
        return
    # bf16: flex rounds p to bf16 before the value product, as eager bf16 attention does, so the bound is
    # eager's own bf16 error against the fp32 reference: at most twice it (FlashAttention's test rule), plus
    # one bf16 ulp at the tensor's magnitude (where eager happens to be exact, e.g. p = 1 in a window of 1,
    # the bf16 result still carries its rounding).
    eager = _eager_attention_grads(q, k, v, dout, **band)
    errors = []
    for name, got, want, base in zip(("out", "dq", "dk", "dv", "dsink"), (out,) + grads, (ref_out,) + tuple(expected),
                                     eager):
        err, base_err = (got.float() - want.float()).abs().max().item(), (base.float() - want.float()).abs().max().item()
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().max().item()
        errors.append((name, err, 2 * base_err + ulp))
    assert all(err <= bound for _, err, bound in errors), \
        "flex error vs bound (2 x eager bf16 error + 1 ulp): " + ", ".join(f"{n} {e:.3g}/{b:.3g}" for n, e, b in errors)


def _eager_attention_grads(q, k, v, dout, *, scale, sink, lower, upper):
    """Attention as eager bf16 model code computes it (bf16 products, fp32 softmax, p rounded to bf16):
    (out, dq, dk, dv[, dsink]) by autograd."""
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v) + ((sink,) if sink is not None else ())]
    q_, k_, v_ = leaves[:3]
    group = q.shape[1] // k.shape[1]
    k_, v_ = k_.repeat_interleave(group, 1), v_.repeat_interleave(group, 1)
    offset = torch.arange(k.shape[2], device=q.device)[None, :] - torch.arange(q.shape[2], device=q.device)[:, None]
    allowed = torch.ones_like(offset, dtype=torch.bool)
    if lower is not None:
        allowed &= offset >= lower
    if upper is not None:
        allowed &= offset <= upper
    scores = (q_ @ k_.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sink is not None:
        scores = torch.cat([scores, leaves[3].view(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1)
    probs = scores.softmax(-1)[..., :k.shape[2]]
    out = probs.to(v.dtype) @ v_
    return (out,) + torch.autograd.grad(out, leaves, dout)


@pytest.mark.gpu
def test_optimize_window_sink_through_flex_gpu():
    """End to end: the pass emits flex, Inductor compiles it forward and backward, the result and
    the gradients equal eager's."""
    torch.manual_seed(0)
    q = torch.randn(1, 8, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sinks = torch.randn(8, device="cuda", requires_grad=True)
    fn = window_sink(200)
    opt = dsgraph.optimize(fn, policy="auto;attention=flex")
    out = opt(q, k, v, sinks)
    (site,) = [r for r in dsgraph.explain(opt).rewrites if r.op == "attention"]
    assert site.backend == "flex"
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    expected = fn(q, k, v, sinks)
    want = torch.autograd.grad(expected, (q, k, v, sinks), dout)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)  # bf16, as above
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_custom_op_flex_path_gpu():
    """``dsgraph::attention(..., "flex")`` called directly (its backward recomputes under autograd)."""
    site = dict(seq=700, keys=700, lower=-99, upper=0, group=4, hkv=2, sink="randn", seed=1)
    q, k, v, sink = _tensors(site, device="cuda", dim=64, dim_v=64)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, sink)]
    out, _ = torch.ops.dsgraph.attention(*leaves[:3], leaves[3], None, None, 0.125, -99, 0, "flex")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    band = dict(scale=0.125, sink=sink, lower=-99, upper=0)
    ref_out, ref_lse = attention_ref(q, k, v, **band)
    torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=2e-4)  # fp32, flex's other summation order
    for got, want in zip(grads, attention_ref_backward(q, k, v, ref_out, ref_lse, dout, **band)):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
