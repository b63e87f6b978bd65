"""The sparse-attention and MLA-absorption passes on captured graphs: attention with a top-k scatter
mask becomes dsgraph::sparse_attention (MHA and latent layouts), MHA-mode MLA becomes the latent form;
the report counts each rewrite and outputs and gradients equal eager's."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.func import functional_call

import dsgraph
from dsgraph.models import DeepseekV32Config, DeepseekV32ForCausalLM, mla_attention
from dsgraph.passes import AttentionPass, MaskPass, MLAAbsorbPass, SparseAttentionPass
from dsgraph.passes.mla_absorb import absorb_profitable
from dsgraph.testing import assert_rewrites, rewrite

SPARSE = [MaskPass(), AttentionPass(), SparseAttentionPass()]
ABSORB = SPARSE + [MLAAbsorbPass()]
FORMS = ("mha", "latent_cat", "latent_slice")


def make_fn(form, B, S, T, K, causal, scale=0.3):
    """Eager attention whose mask is top-k of an index score (causally masked like the indexer, so
    early rows keep fewer than K valid keys) scattered into -inf, plus the causal mask."""
    def mask(index_scores):
        causal_mask = torch.full((S, T), float("-inf")).triu_(T - S + 1) if causal else torch.zeros(S, T)
        idx = (index_scores + causal_mask).topk(min(K, T), dim=-1)[1]
        m = torch.full((B, S, T), float("-inf")).scatter_(-1, idx, 0)
        return m + causal_mask

    if form == "mha":  # the official prefill layout [B, S, H, D]
        def fn(q, k, v, index_scores):
            s = torch.einsum("bshd,bthd->bsht", q.float(), k.float()) * scale
            s = s + mask(index_scores).unsqueeze(-2)
            return torch.einsum("bsht,bthd->bshd", s.softmax(-1, dtype=torch.float32).type_as(v), v)
    elif form == "latent_cat":  # absorbed MLA: key = [latent, rope], values = latent
        def fn(q, kv, k_pe, index_scores):
            k = torch.cat([kv, k_pe], dim=-1)
            s = torch.einsum("bhsc,btc->bhst", q.float(), k.float()) * scale + mask(index_scores)[:, None]
            return torch.einsum("bhst,btc->bhsc", s.softmax(-1, dtype=torch.float32).type_as(kv), kv)
    else:  # values = the first d_v dims of the shared key
        def fn(q, k, index_scores):
            s = q @ k[:, None].transpose(-1, -2) * scale + mask(index_scores)[:, None]
            return s.softmax(-1) @ k[:, None, :, :4]
    return fn


@st.composite
def sites(draw):
    form = draw(st.sampled_from(FORMS))
    B, S = draw(st.integers(1, 2)), draw(st.integers(1, 8))
    T = S + draw(st.integers(0, 4))
    H, D = draw(st.integers(1, 4)), draw(st.sampled_from([8, 12]))
    K, causal = draw(st.integers(1, T + 3)), draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16])) if form != "latent_slice" else torch.float32
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    scores = torch.randn(B, S, T, generator=g)
    if form == "mha":
        args = [randn(B, S, H, D), randn(B, T, H, D), randn(B, T, H, 6), scores]
    elif form == "latent_cat":
        args = [randn(B, H, S, D + 4), randn(B, T, D), randn(B, T, 4), scores]
    else:
        args = [randn(B, H, S, D), randn(B, T, D), scores]
    return form, make_fn(form, B, S, T, K, causal), args, dtype


def _check(site, policy):
    form, fn, args, dtype = site
    report = assert_rewrites(fn, args, pass_name="sparse_attention", passes=SPARSE, policy=policy)
    (rw,) = [r for r in report.rewrites if r.op == "sparse_attention"]
    assert ("latent" in rw.detail) == (form != "mha"), report
    assert str(dtype).removeprefix("torch.") in rw.detail, report  # bf16 casts to fp32 are peeled
    return rw


@given(sites())
def test_topk_attention_becomes_sparse_reference(site):
    assert _check(site, "reference").backend == "torch"


@settings(max_examples=max(4, settings.default.max_examples // 3))  # the interpreter: ~2 s an example
@given(sites())
def test_topk_attention_becomes_sparse_triton_interpreter(site):
    assert _check(site, "reference;sparse_attention=triton;strict").backend == "triton"


def test_indices_that_may_repeat_are_left_alone():
    def repeated(q, k, v, idx):  # a scatter mask of arbitrary indices: membership, not a gather
        m = torch.full((1, 4, 4), float("-inf")).scatter_(-1, idx, 0) + torch.full((4, 4), float("-inf")).triu_(1)
        s = torch.einsum("bshd,bthd->bsht", q, k) + m.unsqueeze(-2)
        return torch.einsum("bsht,bthd->bshd", s.softmax(-1), v)

    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    idx = torch.tensor([[[0, 0], [1, 1], [0, 2], [3, 3]]])
    gm, report = rewrite(repeated, [q, k, v, idx], passes=SPARSE)
    assert report.count("attention") == 1 and report.count("sparse_attention") == 0, report
    assert any("repeats cannot be ruled out" in s.reason for s in report.skipped), report
    out = gm(q, k, v, idx)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, repeated(q, k, v, idx))


def test_padding_mask_is_gathered_and_per_head_bias_left_alone():
    def fn(q, k, v, scores, keep, head_bias):
        causal = torch.full((5, 6), float("-inf")).triu_(2)
        idx = (scores + causal).topk(3, dim=-1)[1]  # as the indexer: valid keys first
        m = torch.full((2, 5, 6), float("-inf")).scatter_(-1, idx, 0) + causal
        s = torch.einsum("bshd,bthd->bsht", q, k) + m.unsqueeze(-2) + (1.0 - keep[:, None, None, :]) * -1e9
        return torch.einsum("bsht,bthd->bshd", (s + head_bias).softmax(-1), v)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 8, generator=g, requires_grad=True) for n in (5, 6, 6))
    keep = torch.ones(2, 6)
    keep[0, :1] = 0  # a padded key; every row keeps a valid one (a row with none differs, see README)
    scores = torch.randn(2, 5, 6, generator=g)
    report = assert_rewrites(fn, [q, k, v, scores, keep, torch.zeros(1, 1, 1, 1)], pass_name="sparse_attention",
                             passes=SPARSE)
    assert "bias [2, 1, 1, 6] gathered" in report.rewrites[-1].detail, report
    _, report = rewrite(fn, [q, k, v, scores, keep, torch.randn(1, 1, 3, 1)], passes=SPARSE)  # [B, S, H, T]
    assert report.count("sparse_attention") == 0, report
    assert any("per-head bias" in s.reason for s in report.skipped), report


# --- MLA absorption ------------------------------------------------------------------------------
def make_mla(B, S, past, H, dn, r, dv, c, K, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = S + past
    kv_b = torch.nn.Linear(c, H * (dn + dv), bias=False).to(dtype)
    torch.nn.init.normal_(kv_b.weight, generator=g, std=c ** -0.5)

    def fn(q_nope, q_pe, kv, k_pe, weight, index_scores):
        causal = torch.full((S, T), float("-inf")).triu_(past + 1)
        idx = (index_scores + causal).topk(min(K, T), dim=-1)[1]
        mask = torch.full((B, S, T), float("-inf")).scatter_(-1, idx, 0) + causal
        proj = lambda x: torch.nn.functional.linear(x, weight)  # noqa: E731  (kv_b_proj with this weight)
        return mla_attention(q_nope, q_pe, kv, k_pe, proj, mask, None, (dn + r) ** -0.5, dv)[0]

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    args = [randn(B, S, H, dn), randn(B, S, H, r), randn(B, T, c), randn(B, T, r),
            kv_b.weight.detach().clone().requires_grad_(), torch.randn(B, S, T, generator=g)]
    return fn, args


@settings(max_examples=max(6, settings.default.max_examples // 2))  # three traces an example
@given(B=st.integers(1, 2), S=st.integers(1, 6), past=st.integers(0, 3), H=st.integers(2, 4),
       c=st.sampled_from([8, 12]), K=st.integers(1, 10), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2 ** 16))
def test_mha_mla_is_absorbed(B, S, past, H, c, K, dtype, seed):
    fn, args = make_mla(B, S, past, H, 8, 4, 8, c, K, seed, dtype)
    report = assert_rewrites(fn, args, pass_name="mla_absorb", passes=ABSORB)
    assert report.count("mla_absorb") == 1 and report.count("sparse_attention") == 1, report
    # absorbed and non-absorbed graphs agree with each other, not only each with eager
    absorbed, _ = rewrite(fn, args, passes=ABSORB)
    plain, _ = rewrite(fn, args, passes=SPARSE)
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # bf16: W_uk, W_uv products rounded
    torch.testing.assert_close(absorbed(*args)[0], plain(*args)[0], **tol)


def test_absorption_rule():
    assert absorb_profitable(128, 192, 128, 512, 64)  # DeepSeek V3.2
    assert not absorb_profitable(1, 192, 128, 512, 64)
    fn, args = make_mla(1, 4, 0, 1, 4, 2, 4, 12, 2, 0)
    _, report = rewrite(fn, args, passes=ABSORB)
    assert report.count("mla_absorb") == 0 and report.count("sparse_attention") == 1, report
    assert any("not profitable" in s.reason for s in report.skipped), report


# --- the tiny V3.2 model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v32():
    torch.manual_seed(0)
    # all layers dense: make_fx cannot trace the MoE's data-dependent bincount (torch.compile breaks there)
    return DeepseekV32ForCausalLM(DeepseekV32Config.tiny(first_k_dense_replace=2)).eval()


# ~5 s an example (three traces of the model): a sixth of the profile's examples, at least 2.
@settings(max_examples=max(2, settings.default.max_examples // 6))
@given(B=st.integers(1, 2), S=st.integers(1, 10), topk=st.sampled_from([1, 3, 4, 64]), seed=st.integers(0, 2 ** 16))
def test_tiny_v32_rewrites_each_layer(v32, B, S, topk, seed):
    v32.config.index_topk = topk  # read at each forward
    for layer in v32.model.layers:
        layer.self_attn.indexer.index_topk = topk
    names = [n for n, _ in v32.named_parameters()]
    ids = torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(seed))

    def fn(ids, *params):
        return functional_call(v32, dict(zip(names, params)), (ids,)).logits

    params = [p.detach().clone().requires_grad_() for p in v32.parameters()]
    cot = torch.randn(B, S, 128, generator=torch.Generator().manual_seed(seed))
    want = fn(ids, *params)
    want_grads = torch.autograd.grad(want, params, cot, allow_unused=True)
    for passes, absorbed in ((SPARSE, 0), (ABSORB, 2)):
        gm, report = rewrite(fn, [ids, *params], passes=passes)
        assert report.count("sparse_attention") == 2 and report.count("mla_absorb") == absorbed, report
        got = gm(ids, *params)
        got = got[0] if isinstance(got, (tuple, list)) else got
        # Gathered sums (and, absorbed, (q W_uk) . c for q . (W_uk c), (p c) W_uv for p (c W_uv)) reorder
        # fp32 sums through two layers and the loss: ~1e-5 relative, where a wrong rewrite is O(1).
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for a, b in zip(torch.autograd.grad(got, params, cot, allow_unused=True), want_grads, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))


def test_explain_shows_sparse_and_absorbed_attention_per_layer():
    torch.manual_seed(0)
    model = DeepseekV32ForCausalLM(DeepseekV32Config.tiny()).eval()
    ids = torch.randint(0, 128, (1, 12))
    want = model(ids).logits
    opt = dsgraph.optimize(model, policy="reference;residual=eager")
    torch.testing.assert_close(opt(ids).logits, want)
    report = dsgraph.explain(opt)
    rows = [r for r in report.rewrites if r.op == "sparse_attention" and not r.rolled_back]
    assert report.count("sparse_attention") == 2 and report.count("mla_absorb") == 2, report
    assert len({r.location for r in rows}) == 1 and len(rows) == 4, report  # 2 layers x (sparse, absorbed)
    assert "sparse_attention" in str(report) and "latent" in str(report)
