"""The indexer pass on captured graphs: every eager formulation of the Lightning Indexer is rewritten
(the report counts it) and computes what eager computes, forward and backward; top-k sites follow
dsgraph::indexer_topk's tie rule."""
import pytest
import torch
from hypothesis import given, strategies as st

import dsgraph.ops.indexer  # noqa: F401  (registers the ops)
from dsgraph.models.deepseek_v32 import DeepseekV32Attention, DeepseekV32Config, DeepseekV32ForCausalLM, \
    compute_indexer_kl_loss
from dsgraph.passes import AttentionPass, MaskPass
from dsgraph.passes.indexer import IndexerPass
from dsgraph.testing import assert_rewrites, dtypes, rewrite
from test_kernel_indexer import assert_close, assert_topk_matches

PASSES = [MaskPass(), IndexerPass(), AttentionPass()]
PRODUCTS = ("einsum", "einsum_hs", "matmul")
MASKS = ("none", "causal", "causal_input", "window", "masked_fill", "padding", "causal_padding")
CONSUMERS = ("scores", "topk_indices", "topk_both")


def make_indexer(S: int, T: int, *, product: str, head_sum: str, weights_first: bool, sum_dim: int, cast: bool,
                 scale: bool, mask: str, consumer: str, topk: int):
    """An eager indexer of (q [B,S,H,D], k [B,T,D], weights [B,S,H], padding [B,T] additive,
    causal [S,T] additive) written in the requested style."""
    offset = T - S  # queries are the last S positions

    def fn(q, k, weights, padding, causal):
        if cast:
            q, k = q.float(), k.float()
        if scale:  # a positive scale on q commutes with the relu: folded into the weights
            q = q * q.shape[-1] ** -0.5
        if product == "einsum":
            logits = torch.einsum("bshd,btd->bsht", q, k)
        elif product == "einsum_hs":  # heads before queries: the head sum is dim 1
            logits = torch.einsum("bshd,btd->bhst", q, k)
        else:
            logits = q @ k.transpose(-1, -2).unsqueeze(1)
        if head_sum == "einsum":
            scores = torch.einsum("bhst,bsh->bst" if product == "einsum_hs" else "bsht,bsh->bst",
                                  torch.relu(logits), weights.to(logits.dtype))  # einsum does not promote
        else:
            w = weights[..., None] if product != "einsum_hs" else weights.transpose(1, 2)[..., None]
            dim = 1 if product == "einsum_hs" else sum_dim
            scores = (w * torch.relu(logits) if weights_first else torch.relu(logits) * w).sum(dim=dim)
        if mask in ("causal", "causal_padding"):
            scores += torch.full((S, T), float("-inf")).triu_(offset + 1)
        elif mask == "causal_input":
            scores = scores + causal
        elif mask == "window":
            i = torch.arange(S)[:, None] + offset
            j = torch.arange(T)[None, :]
            scores = scores + torch.zeros(S, T).masked_fill((j > i) | (i - j >= 3), float("-inf"))
        elif mask == "masked_fill":
            scores = scores.masked_fill(torch.ones(S, T, dtype=torch.bool).triu(offset + 1), float("-inf"))
        if mask in ("padding", "causal_padding"):
            scores += padding[:, None, None, :][:, 0]
        if consumer == "scores":
            # a finite function of the scores, as the KL loss is: -inf positions get no cotangent
            return scores.masked_fill(scores.isinf(), 0.0)
        values, indices = scores.topk(topk, dim=-1)
        return (values, indices) if consumer == "topk_both" else indices

    return fn


@st.composite
def indexer_cases(draw):
    S, T = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    mask = draw(st.sampled_from(MASKS))
    if mask != "none" and T < S:  # causal rows aligned to the last key: every query keeps one key
        S, T = T, S
    return dict(S=S, T=T, B=draw(st.integers(1, 2)), H=draw(st.integers(1, 4)), D=draw(st.sampled_from([4, 8])),
                dtype=draw(dtypes()), product=draw(st.sampled_from(PRODUCTS)),
                head_sum=draw(st.sampled_from(["mul_sum", "einsum"])), weights_first=draw(st.booleans()),
                sum_dim=draw(st.sampled_from([2, -2])), cast=draw(st.booleans()), scale=draw(st.booleans()), mask=mask,
                consumer=draw(st.sampled_from(CONSUMERS)), topk=draw(st.integers(1, T)),
                seed=draw(st.integers(0, 2**16)))


def make_args(case, requires_grad: bool):
    g = torch.Generator().manual_seed(case["seed"])
    B, S, T, H, D = (case[n] for n in "BSTHD")
    q = torch.randn(B, S, H, D, generator=g).to(case["dtype"]).requires_grad_(requires_grad)
    k = torch.randn(B, T, D, generator=g).to(case["dtype"]).requires_grad_(requires_grad)
    # fp32 and signed; bf16-representable, so that a cast to the logits' dtype (einsum head sum) is exact
    weights = torch.randn(B, S, H, generator=g).to(case["dtype"]).float().requires_grad_(requires_grad)
    keep = torch.rand(B, T, generator=g) > 0.3
    keep[:, -1] = True
    padding = (~keep).float() * torch.finfo(torch.float32).min
    causal = torch.full((S, T), float("-inf")).triu(T - S + 1)
    return q, k, weights, padding, causal


def _fn(case, **overrides):
    case = dict(case, **overrides)
    return make_indexer(case["S"], case["T"], **{name: case[name] for name in (
        "product", "head_sum", "weights_first", "sum_dim", "cast", "scale", "mask", "consumer", "topk")})


@given(indexer_cases())
def test_indexer_rewrite(case):
    fn = _fn(case)
    if case["dtype"] != torch.float32 and not case["cast"]:
        # q . k in bf16/fp16 rounds in eager and would not in the op: left alone, with the reason
        args = make_args(case, False)
        gm, report = rewrite(fn, args, passes=PASSES)
        assert report.count("indexer") == 0 and any("computed in" in s.reason for s in report.skipped), report
        for got, want in zip(torch.utils._pytree.tree_leaves(gm(*args)), torch.utils._pytree.tree_leaves(fn(*args))):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    if case["consumer"] == "scores":
        report = assert_rewrites(fn, make_args(case, True), pass_name="indexer", passes=PASSES)
        (site,) = [r for r in report.rewrites if r.pass_name == "indexer"]
        assert site.op == "indexer_scores", report
    else:  # top-k: indices are compared by the tie rule, not exactly
        args = make_args(case, False)
        gm, report = rewrite(fn, args, passes=PASSES)
        (site,) = [r for r in report.rewrites if r.pass_name == "indexer"]
        # bf16 scores (einsum takes one dtype: bf16 logits, bf16 weights, no fp32 mask): their top-k
        # stays a torch.topk on indexer_scores
        eager_dtype = _scores_of(case, args).dtype
        fp32_scores = eager_dtype == torch.float32
        assert site.op == ("indexer_topk" if fp32_scores else "indexer_scores"), report
        # The oracle is the op's semantics, dots in fp32 (eager's bf16 logits are rounded, and a sum
        # over heads with cancellation can lose all relative accuracy of a small score), rounded to
        # the eager scores' dtype (in-place `+=` of fp32 masks keeps bf16 scores bf16: -inf padding).
        scores = _scores_of(dict(case, cast=True), args).to(eager_dtype)
        out = gm(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        indices = out[-1]
        values = scores.gather(-1, indices)
        low = case["dtype"] != torch.float32 or not fp32_scores  # bf16 scores, rounded after the op
        assert_topk_matches(values, indices, scores, case["topk"], low)
        if case["consumer"] == "topk_both":
            assert_close(out[0], values, "top-k values", low)
    if case["mask"] in ("causal", "window", "masked_fill", "causal_padding") and case["S"] > 1:
        assert "band" in site.detail, report  # folded, never materialised as a bias
    if case["mask"] in ("padding", "causal_padding", "causal_input"):
        assert "bias" in site.detail, report


def _scores_of(case, args):
    """The eager masked [B, S, T] scores of a case: its top-T, scattered back."""
    values, indices = _fn(case, consumer="topk_both", topk=case["T"])(*args)
    return torch.empty_like(values).scatter_(-1, indices, values)


def test_weights_inside_the_relu_are_not_matched():
    """relu(w * x) != w * relu(x) for negative weights: never rewritten."""
    def fn(q, k, weights):
        return torch.relu(weights[..., None] * torch.einsum("bshd,btd->bsht", q, k)).sum(2)

    args = (torch.randn(1, 4, 2, 8), torch.randn(1, 5, 8), torch.randn(1, 4, 2))
    gm, report = rewrite(fn, args, passes=PASSES)
    assert report.count("indexer") == 0
    torch.testing.assert_close(gm(*args), fn(*args))


@pytest.mark.parametrize("variant, reason", [
    ("sum_over_keys", "not a query head dim"),
    ("keys_per_head", "keys vary over the summed"),
    ("weights_per_key", "weights vary over the keys"),
    ("learned_bias", "requires grad"),
    ("two_dims", "expected one dim"),
    ("bool_mask", "boolean mask other than a band"),
])
def test_sites_outside_the_op_are_left_alone(variant, reason):
    def fn(q, k, weights, bias):
        kk = k[:, :, None].expand(-1, -1, q.shape[2], -1) if variant == "keys_per_head" else k
        eq = "bshd,bthd->bsht" if variant == "keys_per_head" else "bshd,btd->bsht"
        logits = torch.einsum(eq, q, kk)
        w = bias[:, :, None, :] if variant == "weights_per_key" else weights[..., None]
        s = w * torch.relu(logits)
        if variant == "sum_over_keys":
            return s.sum(-1)
        if variant == "two_dims":
            return s.sum((1, 2))
        s = s.sum(2)
        if variant == "bool_mask":  # differentiable scores: masked_fill zeroes gradients a bias would pass
            return s.masked_fill(bias > 1, float("-inf"))
        return s + bias if variant == "learned_bias" else s

    args = (torch.randn(1, 4, 2, 8, requires_grad=variant == "bool_mask"), torch.randn(1, 5, 8),
            torch.randn(1, 4, 2), torch.randn(1, 4, 5, requires_grad=variant == "learned_bias"))
    gm, report = rewrite(fn, args, passes=PASSES)
    assert report.count("indexer") == 0
    assert any(reason in s.reason for s in report.skipped if s.pass_name == "indexer"), report
    torch.testing.assert_close(gm(*args), fn(*args))


def test_differentiable_topk_values_take_the_scores_path():
    def fn(q, k, weights):
        scores = (weights[..., None] * torch.relu(torch.einsum("bshd,btd->bsht", q, k))).sum(2)
        return scores.topk(3, dim=-1)[0]

    args = (torch.randn(1, 4, 2, 8, requires_grad=True), torch.randn(1, 6, 8, requires_grad=True),
            torch.randn(1, 4, 2, requires_grad=True))
    report = assert_rewrites(fn, args, pass_name="indexer", passes=PASSES)
    assert [r.op for r in report.rewrites] == ["indexer_scores"]


def test_triton_backend_serves_the_site():
    fn = make_indexer(6, 9, product="einsum", head_sum="mul_sum", weights_first=True, sum_dim=2, cast=True,
                      scale=False, mask="causal_padding", consumer="scores", topk=1)
    case = dict(B=2, S=6, T=9, H=2, D=16, dtype=torch.float32, seed=0)
    report = assert_rewrites(fn, make_args(case, True), pass_name="indexer", passes=PASSES, policy="triton;strict")
    (site,) = [r for r in report.rewrites if r.pass_name == "indexer"]
    assert site.backend == "triton", report


# --- DeepSeek V3.2 ---------------------------------------------------------------------------
def _model(**overrides):
    torch.manual_seed(0)
    # Dense MLPs in every layer: the MoE's bincount (data-dependent shapes) stops make_fx tracing.
    config = DeepseekV32Config.tiny(first_k_dense_replace=2, **overrides)
    return DeepseekV32ForCausalLM(config).eval()


def _model_fn(model, kl: bool):
    names = [n for n, _ in model.named_parameters()]

    def fn(ids, attention_mask, *params):
        # Left-padded queries attend to nothing real: their top-k is a tie among padded keys, and
        # their outputs may differ (README, "Rows that attend to nothing"). Real tokens must match.
        real = attention_mask.bool()
        out = torch.func.functional_call(model, dict(zip(names, params)), (ids,), dict(
            attention_mask=attention_mask, labels=ids.masked_fill(~(real & real.roll(1, 1)), -100),  # shifted
            output_indexer_scores=kl,
            output_indexer_kl_target=kl))
        loss = out.loss
        if kl:
            loss = loss + compute_indexer_kl_loss(  # p = 0: no KL term for padded queries
                out.indexer_scores, [t * real[..., None] for t in out.indexer_kl_targets])
        return loss, out.logits * real[..., None]

    return fn


@pytest.mark.parametrize("kl", [False, True], ids=["sparse", "sparse+kl"])
def test_every_v32_indexer_is_rewritten_and_training_matches(kl):
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[0, :3] = 0  # left padding
    params = [p.detach().requires_grad_() for p in model.parameters()]
    args = (ids, attention_mask, *params)
    fn = _model_fn(model, kl)
    gm, report = rewrite(fn, args, passes=PASSES)
    (loss, logits), (eager_loss, eager_logits) = gm(*args), fn(*args)
    torch.testing.assert_close(logits, eager_logits)
    torch.testing.assert_close(loss, eager_loss)
    # Gradients of the loss (with a random cotangent on the logits too, the large embedding
    # gradients differ by fp32 summation order alone, beyond assert_close's per-element rtol).
    # Without the KL loss the indexer gets no gradient (top-k indices only), in eager as here.
    for got, want in zip(torch.autograd.grad(loss, params, allow_unused=True),
                         torch.autograd.grad(eager_loss, params, allow_unused=True)):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want)
    sites = [r for r in report.rewrites if r.pass_name == "indexer"]
    assert len(sites) == model.config.num_hidden_layers
    # Without the KL loss only the top-k indices are used: the [B, S, T] scores are never built.
    assert {r.op for r in sites} == {"indexer_scores" if kl else "indexer_topk"}, report
    assert all("band None <= j-i <= 0" in r.detail and "bias" in r.detail for r in sites), report


def test_v32_attention_with_the_causal_mask_as_an_input():
    """A mask built outside the traced graph arrives as a tensor: kept as a bias, still rewritten."""
    torch.manual_seed(0)
    config = DeepseekV32Config.tiny()
    attn = DeepseekV32Attention(config)
    model = DeepseekV32ForCausalLM(config)
    S = 7
    x = torch.randn(1, S, config.hidden_size)
    freqs = model.model.freqs_cis(torch.arange(S))
    mask = torch.full((S, S), float("-inf")).triu(1)

    def fn(x, mask):
        out, scores, _, _ = attn(x, freqs, mask, output_indexer_scores=True)
        return out, scores.masked_fill(scores.isinf(), 0.0)

    report = assert_rewrites(fn, (x.requires_grad_(), mask), pass_name="indexer", passes=PASSES)
    (site,) = [r for r in report.rewrites if r.pass_name == "indexer"]
    assert site.op == "indexer_scores" and "bias [1, 7, 7]" in site.detail, report


def test_torch_compile_trains_through_both_ops():
    """Through Dynamo and AOTAutograd (the joint graph holds both ops), with compile-time verify."""
    import dsgraph

    def fn(q, k, weights, padding):
        S, T = q.shape[1], k.shape[1]
        scores = (weights[..., None] * torch.relu(torch.einsum("bshd,btd->bsht", q.float(), k.float()))).sum(2)
        scores = scores + torch.full((S, T), float("-inf")).triu(1) + padding[:, None]
        indices = scores.detach().topk(3, dim=-1)[1]  # stays a torch.topk, on indexer_scores' output
        # a second site whose only consumer is its top-k: indexer_topk
        sparse = (weights[..., None] * torch.relu(torch.einsum("bshd,btd->bsht", q, k))).sum(2).topk(3, dim=-1)[1]
        return torch.log_softmax(scores, -1).masked_fill(scores.isinf(), 0.0), indices, sparse

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 8, 3, 16, generator=gen, requires_grad=True),
            torch.randn(2, 8, 16, generator=gen, requires_grad=True),
            torch.randn(2, 8, 3, generator=gen, requires_grad=True), torch.zeros(2, 8))
    opt = dsgraph.optimize(fn, passes=PASSES, policy="reference;residual=eager", verify=True)
    (got, got_idx, got_sparse), (want, want_idx, want_sparse) = opt(*args), fn(*args)
    torch.testing.assert_close(got, want)
    # the torch backend computes eager's expression: same scores bit for bit, same top-k
    torch.testing.assert_close(got_idx, want_idx)
    cot = torch.randn(want.shape, generator=gen)
    for a, e in zip(torch.autograd.grad(got, args[:3], cot), torch.autograd.grad(want, args[:3], cot)):
        torch.testing.assert_close(a, e)
    report = dsgraph.explain(opt)
    assert sorted(r.op for r in report.rewrites if r.pass_name == "indexer") == ["indexer_scores", "indexer_topk"]
    assert all(r.verified for r in report.rewrites), report
    torch.testing.assert_close(got_sparse, want_sparse)


@pytest.mark.parametrize("fill", [-1e4, torch.finfo(torch.float32).min])
def test_finite_fills_are_values_not_masks(fill):
    """No softmax follows the indexer scores, so a finite 'mask' value is a value: a band or a
    padding mask written with it stays in the graph (or a bias), never the op's -inf."""
    B, S, T, H, D = 1, 4, 6, 2, 8
    torch.manual_seed(0)
    pad = torch.tensor([[False, False, False, True, True, False]])

    def band(q, k, w):
        logits = torch.einsum("bshd,btd->bsht", q.float(), k.float())
        return (w[..., None] * torch.relu(logits)).sum(dim=2) + torch.full((S, T), fill).triu(T - S + 1)

    def padded(q, k, w):
        logits = torch.einsum("bshd,btd->bsht", q.float(), k.float())
        return (w[..., None] * torch.relu(logits)).sum(dim=2).masked_fill(pad[:, None, :], fill)

    args = (torch.randn(B, S, H, D, requires_grad=True), torch.randn(B, T, D, requires_grad=True),
            (torch.rand(B, S, H) + 1).requires_grad_())
    for fn in (band, padded):
        report = assert_rewrites(fn, args, pass_name="indexer", passes=PASSES)
        assert "band" not in str(report.rewrites[-1].detail), report
