"""The pooling pass on captured graphs: Compressor-like poolings (plain and overlapping windows, any ratio,
incomplete trailing windows, fp32 and bf16, ape or none, kv/score written as the model or as variants) become
one dsgraph::window_pool computing eager's outputs and gradients (torch and Triton kernels); poolings outside
the op are left alone with the reason; each Compressor of the tiny DeepSeek V4 is rewritten."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from dsgraph.models import DeepseekV4Config, DeepseekV4ForCausalLM
from dsgraph.models.deepseek_v4 import overlap_transform, rope_freqs_cis
from dsgraph.passes import PoolingPass
from dsgraph.testing import assert_left_alone, assert_rewrites, rewrite

PASSES = [PoolingPass()]
OP = torch.ops.dsgraph.window_pool.default


def compressor(x, wkv, wgate, ape, ratio, overlap, *, upcast=True, ape_shape="rw", slice_after=False,
               kv_first=True, dims="positive", rounded=None):
    """The Compressor's pooling as ``models/deepseek_v4.py`` writes it (the defaults), and variants: the
    projections in x's dtype (``upcast=False``), ape as [1, 1, r, w] / [w] / absent, the tokens sliced
    after the projections, the product's operand order, dims negative. ``rounded``: the projections'
    values rounded to that dtype, their gradients not (a float64 run's view of a low-precision chain)."""
    r = ratio
    P = x.shape[1] // r
    xw = x if slice_after else x[:, :P * r]
    xw = xw.float() if upcast else xw
    kv, score = F.linear(xw, wkv.float() if upcast else wkv), F.linear(xw, wgate.float() if upcast else wgate)
    if rounded is not None:
        kv, score = (t + (t.to(rounded).to(t.dtype) - t).detach() for t in (kv, score))
    if slice_after:
        kv, score = kv[:, :P * r], score[:, :P * r]
    kv, score = kv.unflatten(1, (P, r)), score.unflatten(1, (P, r))
    if ape is not None:
        a = ape.float() if upcast else ape
        score = score + {"rw": a, "11rw": a[None, None], "w": a[0]}[ape_shape]
    if overlap:
        kv, score = overlap_transform(kv, 0.0), overlap_transform(score, float("-inf"))
    dim = 2 if dims == "positive" else -2
    p = score.softmax(dim=dim)
    return (kv * p if kv_first else p * kv).sum(dim=dim)


@st.composite
def sites(draw):
    overlap = draw(st.booleans())
    ratio = draw(st.integers(1, 6))
    d = draw(st.integers(1, 6))
    S = draw(st.integers(ratio, 5 * ratio + ratio - 1))  # often not a multiple of the ratio
    style = dict(upcast=draw(st.booleans()), ape_shape=draw(st.sampled_from(["rw", "11rw", "w", "none"])),
                 slice_after=draw(st.booleans()), kv_first=draw(st.booleans()),
                 dims=draw(st.sampled_from(["positive", "negative"])))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    # Triton's CPU interpreter truncates fp32 -> bf16 casts (1.0 + 3 * 2**-9 becomes 1.0; a GPU rounds to
    # 1.0078125), doubling the kernel's output rounding: bf16 Triton kernels are checked by the GPU tests
    # (tests/test_kernel_window_pool.py) only.
    backends = ["reference", "triton"] if dtype == torch.float32 else ["reference"]
    return (draw(st.integers(1, 2)), S, draw(st.integers(2, 8)), ratio, (2 if overlap else 1) * d, overlap, style,
            dtype, draw(st.sampled_from(backends)), draw(st.integers(0, 2 ** 16)))


def _args(B, S, C, ratio, w, dtype, seed, ape=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, C, generator=gen).to(dtype)
    ws = [torch.randn(w, C, generator=gen).mul(C ** -0.5).to(dtype) for _ in range(2)]
    a = torch.randn(ratio, w, generator=gen).to(dtype)
    return [t.requires_grad_() for t in [x, *ws] + ([a] if ape else [])]


def _cancellation_atol(fn, args, dtype, rounded, seed):
    """(outputs, gradients) allowance of a low-precision site: twice what rounding the projections moves
    the float64 results. Both graphs pool the same rounded projections, which the float64 oracle does
    not round; where kv of both signs cancel in a window, that common error can exceed the pooled value's
    own ulp, and eager's roundings can cancel it by luck (a thorough run: eager 3x closer to float64
    than the op on a 5-slot window)."""
    wide = [a.detach().double().requires_grad_() for a in args]
    runs = []
    for r in (None, rounded):
        out = fn(*wide, rounded=r)
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype).double()
        runs.append((out, torch.autograd.grad(out, wide, cotangent)))
    (out, grads), (out_r, grads_r) = runs
    return (2 * (out - out_r).abs().max().item(),
            2 * max((g - g_r).abs().max().item() for g, g_r in zip(grads, grads_r)))


@given(sites())
def test_every_written_pooling_is_one_op_with_eager_outputs_and_gradients(site):
    B, S, C, ratio, w, overlap, style, dtype, policy, seed = site
    style = dict(style)
    ape = style.pop("ape_shape")
    args = _args(B, S, C, ratio, w, dtype, seed, ape != "none")

    def fn(x, wkv, wgate, *a, rounded=None):
        return compressor(x, wkv, wgate, a[0] if a else None, ratio, overlap, ape_shape=ape, rounded=rounded, **style)

    low = dtype != torch.float32
    atol = _cancellation_atol(fn, args, dtype, torch.float32 if style["upcast"] else dtype, seed) if low else (0, 0)
    report = assert_rewrites(fn, args, pass_name="pooling", passes=PASSES, policy=policy, seed=seed,
                             cancellation_atol=atol)
    gm, _ = rewrite(fn, args, passes=PASSES, policy=policy)
    (node,) = [n for n in gm.graph.nodes if n.target is OP]
    assert node.args[3:5] == (ratio, overlap), node.args
    assert report.count("pooling") == 1 and not report.skipped, report
    assert report.rewrites[0].backend == ("torch" if policy == "reference" else "triton"), report
    assert (node.args[2] is None) == (ape == "none"), node.args
    # nothing of the eager pooling is left: no softmax, no overlap buffer or its writes
    left = {n.target for n in gm.graph.nodes}
    assert not left & {torch.ops.aten.softmax.int, torch.ops.aten.new_full.default, torch.ops.aten.copy_.default,
                       torch.ops.aten.slice_scatter.default}, gm.graph


def test_the_model_pooling_reads_the_projections_once():
    args = _args(2, 37, 16, 4, 8, torch.float32, 0)
    fn = lambda x, a, b, c: compressor(x, a, b, c, 4, True)  # noqa: E731
    report = assert_rewrites(fn, args, pass_name="pooling", passes=PASSES)
    gm, _ = rewrite(fn, args, passes=PASSES)
    (node,) = [n for n in gm.graph.nodes if n.target is OP]
    assert [a.target for a in node.args[:2]] == [torch.ops.aten.linear.default] * 2  # the [B, 36, 8] projections
    assert node.args[2].op == "placeholder"  # ape read as given (its .float() folded)
    assert report.rewrites[0].detail == ("overlapping windows of 4 tokens: 36 tokens -> 9 pooled x 4 (batch 2), "
                                         "ape [4, 8], kv torch.float32, score torch.float32 -> torch.float32")


def test_a_broadcast_bf16_ape_gets_its_gradient_reduced_in_fp32():
    """ape [w] broadcast to [r, w] in bf16: the op reads it widened to fp32, so its [r, w] gradient is
    summed over the r rows before one rounding, as eager's reduction does (summed in bf16 it was further
    from float64 than eager's: a thorough run's failure)."""
    args = _args(1, 5, 2, 5, 2, torch.bfloat16, 249)

    def fn(x, wkv, wgate, ape):
        return compressor(x, wkv, wgate, ape, 5, True, upcast=False, ape_shape="w")

    gm, report = rewrite(fn, args, passes=PASSES)
    assert report.count("pooling") == 1, report
    (node,) = [n for n in gm.graph.nodes if n.target is OP]
    assert node.args[2].target is torch.ops.aten.expand.default and val_dtype(node.args[2]) == torch.float32
    out = gm(*args)
    got, want = (out[0] if isinstance(out, (tuple, list)) else out), fn(*args)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    dape, dape_eager = (torch.autograd.grad(o, args[3], dout)[0].double() for o in (got, want))
    wide = [a.detach().double().requires_grad_() for a in args]
    exact = torch.autograd.grad(fn(*wide), wide[3], dout.double())[0]
    assert (dape - exact).abs().max() <= (dape_eager - exact).abs().max(), (dape, dape_eager, exact)


def val_dtype(node):
    return node.meta["val"].dtype


def test_verify_checks_the_overlap_rewrite():
    args = _args(1, 20, 8, 4, 6, torch.float32, 1)
    fn = lambda x, a, b, c: compressor(x, a, b, c, 4, True)  # noqa: E731
    _, report = rewrite(fn, args, passes=PASSES, verify=True)
    assert report.rewrites[0].verified is True and not report.rewrites[0].rolled_back, report


# --- left alone ----------------------------------------------------------------------------------------------
def _windows(x, ratio=4):
    P = x.shape[1] // ratio
    return x[:, :P * ratio].unflatten(1, (P, ratio))


def _kv_fill_one(kv, score):
    k, s = _windows(kv), _windows(score)
    return (overlap_transform(k, 1.0) * overlap_transform(s, float("-inf")).softmax(dim=2)).sum(dim=2)


def _only_score_overlapped(kv, score):
    k, s = _windows(kv), _windows(score)
    return (k[..., :3].repeat(1, 1, 2, 1) * overlap_transform(s, float("-inf")).softmax(dim=2)).sum(dim=2)


def _shifted_by_two(kv, score):
    def shifted(t, fill):
        B, P, r, two_d = t.shape
        out = t.new_full((B, P, 2 * r, two_d // 2), fill)
        out[:, :, r:] = t[..., two_d // 2:]
        out[:, 2:, :r] = t[:, :-2, :, :two_d // 2]
        return out
    k, s = _windows(kv), _windows(score)
    return (shifted(k, 0.0) * shifted(s, float("-inf")).softmax(dim=2)).sum(dim=2)


def _broadcast_kv(kv, score):
    return (_windows(kv)[:, :, :1] * _windows(score).softmax(dim=2)).sum(dim=2)


def _weights_used_elsewhere(kv, score):
    p = _windows(score).softmax(dim=2)
    return (_windows(kv) * p).sum(dim=2), p.amax()


LEFT_ALONE = {
    "kv filled with 1": (_kv_fill_one, "overlap buffer is filled with 1.0"),
    "only score overlapped": (_only_score_overlapped, "only score is written in place"),
    "previous window two back": (_shifted_by_two, "not the overlap pattern's"),
    "kv broadcast over the slots": (_broadcast_kv, "differ (a broadcast product)"),
    "softmax weights used elsewhere": (_weights_used_elsewhere, "the softmax weights are also used elsewhere"),
}


@pytest.mark.parametrize("name", sorted(LEFT_ALONE))
def test_poolings_outside_the_op_are_left_alone_with_the_reason(name):
    fn, reason = LEFT_ALONE[name]
    kv, score = torch.randn(2, 13, 6), torch.randn(2, 13, 6)
    report = assert_left_alone(fn, [kv, score], pass_name="pooling", op="window_pool", passes=PASSES)
    assert [s.reason for s in report.skipped if reason in s.reason], report.skipped


NOT_POOLING = {
    "softmax over the last dim": lambda kv, s: (_windows(kv) * _windows(s).softmax(dim=-1)).sum(dim=-1),
    "sum over another dim": lambda kv, s: (_windows(kv) * _windows(s).softmax(dim=2)).sum(dim=1),
    "keepdim sum": lambda kv, s: (_windows(kv) * _windows(s).softmax(dim=2)).sum(dim=2, keepdim=True),
}


@pytest.mark.parametrize("name", sorted(NOT_POOLING))
def test_what_is_not_a_pooling_is_not_touched(name):
    kv, score = torch.randn(2, 12, 6), torch.randn(2, 12, 6)
    report = assert_left_alone(NOT_POOLING[name], [kv, score], pass_name="pooling", op="window_pool", passes=PASSES)
    assert not report.skipped, report


# --- DeepSeek V4 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, sites", [(1, 2), (2, 1)])
def test_each_compressor_of_the_tiny_v4_is_rewritten(layer, sites):
    """The attention of the ratio-4 layer (its Compressor and its Indexer's, overlapping) and of the
    ratio-128 layer (plain; S = 300 so it pools two windows and drops 44 tokens): outputs and the
    gradients of the input and every parameter match eager."""
    config = DeepseekV4Config.tiny()
    torch.manual_seed(0)
    attn = DeepseekV4ForCausalLM(config).layers[layer].attn
    S = 300
    freqs = rope_freqs_cis(config.inv_freq(True, torch.device("cpu")), torch.arange(S))
    names = [n for n, _ in attn.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(attn, dict(zip(names, params)), (x, freqs))

    x = torch.randn(1, S, config.hidden_size, requires_grad=True)
    args = [x] + [p.detach().requires_grad_() for p in attn.parameters()]
    report = assert_rewrites(fn, args, pass_name="pooling", min_count=sites, passes=PASSES)
    assert report.count("pooling") == sites and not report.skipped, report
    ratio = config.compress_ratios[layer]
    assert all(f"windows of {ratio} tokens: {S // ratio * ratio} tokens -> {S // ratio} pooled" in r.detail
               for r in report.rewrites), report
