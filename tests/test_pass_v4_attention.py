"""The V4 attention pass on captured graphs: attention over [local keys; pooled keys] with a sliding
band, the compressed causal threshold and (ratio 4) the indexer's top-k becomes ONE
dsgraph::sparse_attention with the sink over window ∪ pooled index lists; the report counts it, the
dense [S, L + P] mask is gone, and outputs and gradients (q, keys, pooled keys, sink) equal eager."""
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch.func import functional_call

import dsgraph.models.deepseek_v4 as dsv4
from dsgraph.models import DeepseekV4Config, DeepseekV4ForCausalLM, sink_attention
from dsgraph.models.deepseek_v4 import compressed_causal_mask
from dsgraph.passes import AttentionPass, IndexerPass, MaskPass, V4AttentionPass
from dsgraph.passes.v4_attention import SHORT_ROWS, threshold_ratio
from dsgraph.passes.sparse_attention import Reject
from dsgraph.testing import assert_left_alone, assert_rewrites, rewrite

PASSES = [MaskPass(), AttentionPass(), V4AttentionPass()]
NAME = "v4_attention"


def window_mask(S, W, style, device=None):
    """Additive [S, S]: query i sees keys i - W + 1 .. i, written as the model does or with tril."""
    if style == "model":
        return dsv4.sliding_window_mask(S, W, device)
    ones = torch.ones(S, S, dtype=torch.bool, device=device)
    allowed = ones.tril() & ~ones.tril(-W)
    return torch.zeros(S, S, device=device).masked_fill(~allowed, float("-inf"))


def threshold(S, P, r, style, device=None):
    """Additive [S, P]: p visible to i iff p < (i + 1) // r, as the model writes it or as
    (p + 1) * r <= i + 1 with masked_fill (the pass evaluates, it does not match the construction)."""
    if style == "model":
        return compressed_causal_mask(S, P, r, device)
    p, i = torch.arange(P, device=device)[None, :], torch.arange(S, device=device)[:, None]
    return torch.zeros(S, P, device=device).masked_fill((p + 1) * r > i + 1, float("-inf"))


def make_fn(B, S, W, r, K, style="model", pooled_mask=None, device=None):
    """V4 attention as DeepseekV4Attention.forward writes it: keys = [local; pooled], mask =
    [window band; threshold (+ top-k scatter of the index scores when K)], MQA with a sink.
    ``pooled_mask`` replaces the threshold (negative cases)."""
    P = S // r

    def mask_of(index_scores):
        band = window_mask(S, W, style, device)
        pm = threshold(S, P, r, style, device) if pooled_mask is None else pooled_mask
        if K:
            idx = (index_scores + pm).topk(K, dim=-1)[1]
            pm = torch.full((B, S, P), float("-inf"), device=device).scatter_(-1, idx, 0) + pm
        return torch.cat([band.expand(B, S, S), pm.expand(B, S, P)], dim=-1)

    def fn(q, kv, pooled, sink, index_scores):
        keys = torch.cat([kv, pooled], dim=1)
        return sink_attention(q, keys, sink, mask_of(index_scores), q.shape[-1] ** -0.5)
    fn.mask_of = mask_of
    return fn


def make_args(B, S, H, D, P, dtype, sink_scale, seed, device=None):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    sink = ((torch.rand(H, generator=g) * 2 - 1) * sink_scale).to(device, dtype).requires_grad_()
    return [randn(B, S, H, D), randn(B, S, D), randn(B, P, D), sink, torch.randn(B, S, P, generator=g).to(device)]


def assert_low_precision_grads(fn, args, gm, seed=0):
    """Gradients of q, kv, pooled and sink no less accurate than eager's against a float64 run (2x its
    error plus half an ulp of the largest value). The sink's also gets the rounding of the op's output:
    dsink_h = -sum_{b,s} p_sink * rowsum(dout * out) reads out as rounded to bf16 (flash attention's
    delta), which adds at most 2^-8 * sum_{b,s} p_sink * sum_d |dout * out| (a thorough run found eager's
    own error, a different rounding, 3x smaller on one 25-row sum)."""
    q, kv, pooled, sink, scores = args
    got, want = gm(*args), fn(*args)
    got = got[0] if isinstance(got, (tuple, list)) else got
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed)).to(want.dtype)
    wide = [a.detach().double().requires_grad_() for a in args[:4]]
    out64 = fn(*wide, scores)
    exact = torch.autograd.grad(out64, wide, dout.double())
    with torch.no_grad():
        logits = torch.einsum("bshd,btd->bhst", wide[0], torch.cat(wide[1:3], 1)) * q.shape[-1] ** -0.5
        logits = logits + fn.mask_of(scores).double()[:, None]
        sink_col = wide[3].view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
        p_sink = torch.cat([logits, sink_col], -1).softmax(-1)[..., -1]                      # [B, H, S]
        delta = (dout.double() * out64).abs().sum(-1).transpose(1, 2)                        # [B, H, S]
        sink_allowance = 2 ** -8 * (p_sink * delta).sum((0, 2)).max().item()
    for name, g, w, e, extra in zip(("q", "kv", "pooled", "sink"), torch.autograd.grad(got, args[:4], dout),
                                    torch.autograd.grad(want, args[:4], dout), exact, (0, 0, 0, sink_allowance)):
        err, eager_err = ((t.double() - e).abs().max().item() for t in (g, w))
        bound = 2 * eager_err + 2 ** -9 * e.abs().max().item() + extra
        assert err <= bound, f"d{name}: error vs float64 {err:.3g} > {bound:.3g} (eager's {eager_err:.3g})"


def check_rewritten(fn, args, S, T, per_query, policy="reference"):
    low = args[0].dtype == torch.bfloat16
    report = assert_rewrites(fn, args, pass_name=NAME, passes=PASSES, policy=policy, grads=not low)
    assert report.count(NAME) == 1, report
    (rw,) = [r for r in report.rewrites if r.pass_name == NAME]
    assert rw.op == "sparse_attention" and f"{per_query} indices per query" in rw.detail, report
    assert "latent (MQA)" in rw.detail and "sink" in rw.detail, report
    gm, _ = rewrite(fn, args, passes=PASSES, policy=policy)
    if low:
        assert_low_precision_grads(fn, args, gm)
    targets = [n.target for n in gm.graph.nodes]
    assert torch.ops.dsgraph.sparse_attention.default in targets, gm.graph
    assert torch.ops.dsgraph.attention.default not in targets and torch.ops.dsgraph.topk_mask.default not in targets
    # Gone: the window band [S, S] and the [S, T] mask (a threshold that is a band, e.g. P = 1, may stay
    # a band_mask [S, P] for the indexer's scores).
    dense = [n for n in gm.graph.nodes if n.target is torch.ops.dsgraph.band_mask.default and n.args[1] == S or
             n.target is torch.ops.aten.cat.default and n.meta["val"].is_floating_point()
             and tuple(n.meta["val"].shape[-2:]) == (S, T)]
    assert not dense, f"an O(S x S) or O(S x T) mask is left in the graph: {dense}"
    return rw


@st.composite
def sites(draw):
    r = draw(st.sampled_from([4, 8, 16]))  # 16: a small stand-in for ratio 128 (no indexer)
    S = draw(st.integers(r, 3 * r + 5))  # often not a multiple of r
    P = S // r
    topk = r != 16 and draw(st.booleans())
    K = min(draw(st.integers(1, P + 2)), P) if topk else 0  # the model's min(index_topk, P): K < P and K = P
    B, H, D = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([8, 16]))
    W = draw(st.integers(1, 10))  # W >= S masks like plain causal: a window of S
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    style = draw(st.sampled_from(["model", "alt"]))
    sink_scale = draw(st.sampled_from([1.0, 30.0]))
    args = make_args(B, S, H, D, P, dtype, sink_scale, draw(st.integers(0, 2 ** 16)))
    return make_fn(B, S, W, r, K, style), args, S, S + P, min(W, S) + (K if K else P)


@settings(max_examples=max(4, settings.default.max_examples))  # ~0.6 s an example
@given(sites())
def test_compressed_attention_becomes_one_sparse_call(site):
    fn, args, S, T, per_query = site
    check_rewritten(fn, args, S, T, per_query)


@settings(max_examples=max(1, settings.default.max_examples // 12))  # the interpreter: ~10 s an example
@given(sites())
def test_compressed_attention_triton_interpreter(site):
    fn, args, S, T, per_query = site
    assert check_rewritten(fn, args, S, T, per_query, policy="reference;sparse_attention=triton;strict").backend \
        == "triton"


# --- the threshold classifier ------------------------------------------------------------------------
@given(S=st.integers(1, 70), P=st.integers(1, 20), r=st.integers(1, 80))
def test_threshold_ratio_reads_every_threshold(S, P, r):
    plane = compressed_causal_mask(S, P, r)
    got = threshold_ratio(plane)
    if not (plane == 0).any():
        assert got == S + 1  # nothing visible: any r > S says so
    elif (plane == 0).all():
        assert got is None  # everything visible (r = 1, P = 1): no threshold
    else:
        assert torch.equal(compressed_causal_mask(S, P, got), plane)


@pytest.mark.parametrize("plane, match", [
    (torch.where(torch.arange(4)[None] >= torch.arange(16)[:, None] // 4, float("-inf"), 0.0), "not the compressed"),
    (torch.where(torch.arange(4)[None] > torch.arange(1, 17)[:, None] // 4, float("-inf"), 0.0), "not the compressed"),
    (compressed_causal_mask(16, 4, 4).masked_fill(torch.eye(16, 4, dtype=torch.bool), -1.0), "holds -1"),
])
def test_threshold_ratio_rejects_other_masks(plane, match):
    with pytest.raises(Reject, match=match):
        threshold_ratio(plane)


def test_threshold_ratio_all_zero_is_no_threshold():
    assert threshold_ratio(torch.zeros(5, 3)) is None


# --- sites left alone ----------------------------------------------------------------------------------
def _left_alone(fn, args, reason):
    report = assert_left_alone(fn, args, pass_name=NAME, op="sparse_attention", passes=PASSES)
    assert any(s.pass_name == NAME and reason in s.reason for s in report.skipped), report


def test_threshold_of_another_form_is_left_alone():
    S, P = 13, 3
    shifted = torch.where(torch.arange(P)[None] >= torch.arange(S)[:, None] // 4, float("-inf"), 0.0)  # i // r
    _left_alone(make_fn(1, S, 4, 4, 2, pooled_mask=shifted), make_args(1, S, 2, 8, P, torch.float32, 1, 0),
                "not the compressed causal threshold")
    _left_alone(make_fn(1, S, 4, 4, 0, pooled_mask=shifted), make_args(1, S, 2, 8, P, torch.float32, 1, 0),
                "not the compressed causal threshold")


def test_per_head_pooled_mask_is_left_alone():
    B, S, H, D, P = 1, 12, 2, 8, 3

    def fn(q, kv, pooled, sink, head_mask):
        keys = torch.cat([kv, pooled], dim=1)
        band = dsv4.sliding_window_mask(S, 4).expand(H, S, S)
        mask = torch.cat([band, compressed_causal_mask(S, P, 4) + head_mask], dim=-1)  # [H, S, T]
        scores = torch.einsum("bhsd,btd->bhst", q.transpose(1, 2), keys) * D ** -0.5 + mask
        probs = torch.cat([scores, sink.view(1, H, 1, 1).expand(B, H, S, 1)], -1).softmax(-1)[..., :-1]
        return torch.einsum("bhst,btd->bhsd", probs, keys).transpose(1, 2)

    args = make_args(B, S, H, D, P, torch.float32, 1, 0)[:4] + [torch.zeros(H, 1, P)]
    _left_alone(fn, args, "per-head mask")


def test_full_causal_local_mask_is_left_alone():
    S, P = SHORT_ROWS + 1, 3  # up to SHORT_ROWS a causal band is a window of S (a short V4 prompt)

    def fn(q, kv, pooled, sink, _):
        causal = torch.full((S, S), float("-inf")).triu(1)  # no window: O(S) local keys per query
        mask = torch.cat([causal.expand(1, S, S), compressed_causal_mask(S, P, 4).expand(1, S, P)], -1)
        return sink_attention(q, torch.cat([kv, pooled], 1), sink, mask, 0.3)

    _left_alone(fn, make_args(1, S, 2, 8, P, torch.float32, 1, 0), "not a finite window")


def test_indices_that_may_repeat_are_left_alone():
    S, P = 12, 3

    def fn(q, kv, pooled, sink, idx):
        pm = torch.full((1, S, P), float("-inf")).scatter_(-1, idx, 0) + compressed_causal_mask(S, P, 4)
        mask = torch.cat([dsv4.sliding_window_mask(S, 4).expand(1, S, S), pm], -1)
        return sink_attention(q, torch.cat([kv, pooled], 1), sink, mask, 0.3)

    idx = torch.zeros(1, S, 2, dtype=torch.int64)  # index 0 twice per row
    _left_alone(fn, make_args(1, S, 2, 8, P, torch.float32, 1, 0)[:4] + [idx], "repeats cannot be ruled out")


def test_finite_pooled_bias_is_left_alone():
    S, P = 12, 3
    bias = compressed_causal_mask(S, P, 4).masked_fill(torch.eye(S, P, dtype=torch.bool), 0.5)
    _left_alone(make_fn(1, S, 4, 4, 0, pooled_mask=bias), make_args(1, S, 2, 8, P, torch.float32, 1, 0),
                "only 0 and -inf")


# --- the tiny V4 model ---------------------------------------------------------------------------------
def _attention_fn(model, layer, S):
    attn = model.layers[layer].attn
    names = [n for n, _ in attn.named_parameters()]
    freqs = dsv4.rope_freqs_cis(model.config.inv_freq(True), torch.arange(S))

    def fn(x, *params):
        return functional_call(attn, dict(zip(names, params)), (x, freqs))
    return fn, [p.detach().clone().requires_grad_() for p in attn.parameters()]


def _check_layer(model, layer, B, S, seed, dtype=torch.float32):
    fn, params = _attention_fn(model, layer, S)
    x = torch.randn(B, S, model.config.hidden_size, generator=torch.Generator().manual_seed(seed)).to(dtype)
    passes = PASSES + [IndexerPass()]  # the indexer's top-k arrives as dsgraph::indexer_topk
    report = assert_rewrites(fn, [x.requires_grad_(), *params], pass_name=NAME, passes=passes)
    assert report.count(NAME) == 1 and report.count("indexer") == (layer == 1), report
    return next(r for r in report.rewrites if r.pass_name == NAME)


def test_tiny_v4_both_compressed_layers():
    """The released ratios (4 and 128): S = 260 gives the ratio-128 layer two pooled keys."""
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config.tiny()).eval()
    ratio4 = _check_layer(model, 1, 1, 260, 0)
    assert "top-4 of 65 pooled (p < (i + 1) // 4), 12 indices per query" in ratio4.detail, ratio4
    ratio128 = _check_layer(model, 2, 1, 260, 0)
    assert "all 2 pooled (p < (i + 1) // 128), 10 indices per query" in ratio128.detail, ratio128


@pytest.fixture(scope="module")
def short_v4():
    torch.manual_seed(0)
    return DeepseekV4ForCausalLM(DeepseekV4Config.tiny(compress_ratios=[0, 4, 8])).eval()


@settings(max_examples=max(2, settings.default.max_examples // 4))  # ~2 s an example
@given(B=st.integers(1, 2), S=st.integers(8, 40), topk=st.sampled_from([1, 3, 4, 64]), layer=st.sampled_from([1, 2]),
       seed=st.integers(0, 2 ** 16))
def test_tiny_v4_short_ratios(short_v4, B, S, topk, layer, seed):
    short_v4.layers[1].attn.indexer.index_topk = topk  # read at each forward
    _check_layer(short_v4, layer, B, S, seed)


# --- GPU: V4-Flash widths, each kernel against the torch reference -----------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "tilelang"])
@pytest.mark.parametrize("ratio, K", [(4, 512), (128, 0)])
def test_v4_flash_site_on_gpu(backend, ratio, K):
    """H = 64, D = 512, window 128, S = 4096 bf16: the rewritten site on ``backend`` equals the torch
    reference's rewrite, outputs and gradients."""
    B, S, H, D, W = 1, 4096, 64, 512, 128
    fn = make_fn(B, S, W, ratio, K, device="cuda")
    args = make_args(B, S, H, D, S // ratio, torch.bfloat16, 30.0, 0, device="cuda")
    results = []
    for policy in ("reference", f"reference;sparse_attention={backend};strict"):
        gm, report = rewrite(fn, args, passes=PASSES, policy=policy)
        assert report.count(NAME) == 1, report
        out = gm(*args)
        out = out[0] if isinstance(out, (tuple, list)) else out
        grads = torch.autograd.grad(out, args[:4], torch.ones_like(out) / S)
        results.append([out, *grads])
    for got, want in zip(*reversed(results)):
        # bf16 outputs and gradients accumulated in another order: a few bf16 ulps
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@settings(max_examples=max(4, settings.default.max_examples // 2))
@given(S=st.integers(2, 40), W=st.integers(1, 12), H=st.sampled_from([1, 4]), seed=st.integers(0, 2 ** 16))
def test_sliding_layers_become_a_window_index_list(S, W, H, seed):
    """A V4 sliding layer (band + sink, one K = V head): on CPU the dense op has only the reference
    kernel (as at head dim 512 on a GPU), so the window becomes the index list: W entries a query.
    (With W >= S the mask is plain causal, no window: that site stays dense.)"""
    assume(W < S)
    def fn(q, kv, sink):
        return sink_attention(q, kv, sink, window_mask(S, W, "model"), q.shape[-1] ** -0.5)
    g = torch.Generator().manual_seed(seed)
    args = [torch.randn(1, S, H, 16, generator=g).requires_grad_(), torch.randn(1, S, 16, generator=g).requires_grad_(),
            (torch.rand(H, generator=g) * 60 - 30).requires_grad_()]
    rw = check_rewritten(fn, args, S, S, W)
    assert "no pooled keys" in rw.detail
