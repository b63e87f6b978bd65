"""The attention and masks passes on captured graphs: every eager formulation is rewritten (the
report counts it) and computes what eager computes, forward and backward."""
import dataclasses
import math

import pytest
import torch
from hypothesis import given, strategies as st

import dsgraph
from dsgraph.testing import (AttentionShape, MaskSpec, assert_rewrites, attention_shapes, dtypes,
                             eager_mask, masks, rewrite)

PRODUCTS = ("einsum_bhsd", "einsum_bshd", "matmul", "einsum_group", "bmm")
SCALES = ("scores_mul", "scores_div", "on_q", "on_q_and_k")
SOFTMAXES = ("dtype_fp32", "cast_fp32", "input_dtype")
REPEATS = ("repeat_kv", "repeat_interleave", "expand")


def make_attention(shape: AttentionShape, spec: MaskSpec, *, product: str, scale_at: str, softmax: str,
                   repeat: str, sink: bool):
    """An eager attention function of (q [B,Hq,S,D], k, v [B,Hkv,T,*], attention_mask, topk, sinks)
    written in the requested style."""
    B, H, Hkv, S, T, D = (shape.batch, shape.q_heads, shape.kv_heads, shape.queries, shape.keys,
                          shape.head_dim)
    G = H // Hkv
    scale = D ** -0.5

    def repeat_heads(x):
        if repeat == "repeat_interleave":
            return x.repeat_interleave(G, dim=1)
        if repeat == "expand" and Hkv == 1:
            return x.expand(B, H, *x.shape[2:])
        return x[:, :, None].expand(B, Hkv, G, *x.shape[2:]).reshape(B, H, *x.shape[2:])

    def fn(q, k, v, attention_mask, topk_index, sinks):
        if scale_at == "on_q":
            q = q * scale
        elif scale_at == "on_q_and_k":
            q, k = q * scale ** 0.5, k * scale ** 0.5
        if product == "einsum_group":
            s = torch.einsum("bkgsd,bktd->bkgst", q.view(B, Hkv, G, S, D), k)
        elif product == "einsum_bshd":
            s = torch.einsum("bshd,bthd->bsht", q.transpose(1, 2), repeat_heads(k).transpose(1, 2))
        elif product == "einsum_bhsd":
            s = torch.einsum("bhsd,bhtd->bhst", q, repeat_heads(k))
        elif product == "bmm":
            s = torch.bmm(q.reshape(B * H, S, D), repeat_heads(k).reshape(B * H, T, D).transpose(1, 2))
        else:
            s = q @ repeat_heads(k).transpose(-2, -1)
        if softmax == "dtype_fp32":
            s = s.float()
        if scale_at == "scores_mul":
            s = s * scale
        elif scale_at == "scores_div":
            s = s / math.sqrt(D)
        kind, mask = eager_mask(spec, S, T, attention_mask=attention_mask, topk_index=topk_index)
        if mask is not None:
            if product == "einsum_group":
                mask = mask.unsqueeze(1)  # [B, 1, 1, S, T] against [B, Hkv, G, S, T]
            elif product == "einsum_bshd":
                mask = mask.transpose(1, 2)  # [B, S, 1, T] against [B, S, H, T]
            elif product == "bmm":
                mask = mask.expand(B, H, S, T).reshape(B * H, S, T)
            if kind == "add":
                s = s + mask
            elif kind == "blocked":
                s = s.masked_fill(mask, float("-inf"))
            else:
                s = torch.where(mask, s, float("-inf"))
        if sink:
            column = {"einsum_group": sinks.view(1, Hkv, G, 1, 1), "einsum_bshd": sinks.view(1, 1, H, 1),
                      "bmm": sinks.view(1, H, 1, 1).expand(B, H, 1, 1).reshape(B * H, 1, 1)}.get(
                          product, sinks.view(1, H, 1, 1))
            s = torch.cat([s, column.to(s.dtype).expand(*s.shape[:-1], 1)], dim=-1)
        if softmax == "dtype_fp32":
            p = torch.softmax(s, dim=-1, dtype=torch.float32)
        elif softmax == "cast_fp32":
            p = s.float().softmax(-1)
        else:
            p = torch.nn.functional.softmax(s, dim=-1)
        if sink:
            p = p[..., :-1]
        p = p.to(v.dtype)
        if product == "einsum_group":
            return torch.einsum("bkgst,bktd->bkgsd", p, v).reshape(B, H, S, -1)
        if product == "einsum_bshd":
            return torch.einsum("bsht,bthd->bshd", p, repeat_heads(v).transpose(1, 2)).transpose(1, 2)
        if product == "bmm":
            return torch.bmm(p, repeat_heads(v).reshape(B * H, T, -1)).view(B, H, S, -1)
        return p @ repeat_heads(v)

    return fn


def make_inputs(shape: AttentionShape, spec: MaskSpec, dtype, seed: int, *, sink: bool):
    """Random inputs where every query row keeps at least one key (its diagonal, with causal masks):
    a row with none is NaN or an arbitrary average in eager, depending on how the mask is written."""
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, S, T = shape.batch, shape.q_heads, shape.kv_heads, shape.queries, shape.keys
    q = torch.randn(B, H, S, shape.head_dim, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, T, shape.head_dim, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, T, shape.value_dim, generator=g).to(dtype).requires_grad_()
    offset = T - S
    keep = torch.ones(B, T, dtype=torch.long)
    protected = offset if spec.causal else T - 1  # keys at or after this one are never padded
    keep[:, :max(protected, 0)] = (torch.rand(B, max(protected, 0), generator=g) > 0.4).long()
    K = min(spec.topk or 1, T)
    topk = torch.randint(0, T, (B, S, K), generator=g)
    diagonal = (torch.arange(S) + offset).clamp(0, T - 1) if spec.causal else torch.full((S,), T - 1)
    topk[:, :, 0] = diagonal
    sinks = torch.randn(H, generator=g).requires_grad_() if sink else torch.zeros(H)
    return (q, k, v, keep, topk, sinks)


@st.composite
def attention_cases(draw):
    spec = draw(masks())
    shape = draw(attention_shapes())
    if spec.causal and shape.keys < shape.queries:  # causal rows aligned to the last key
        shape = AttentionShape(shape.batch, shape.q_heads, shape.kv_heads, shape.keys, shape.queries,
                               shape.head_dim, shape.value_dim)
    product = draw(st.sampled_from(PRODUCTS))
    return dict(shape=shape, spec=spec, product=product, scale_at=draw(st.sampled_from(SCALES)),
                softmax=draw(st.sampled_from(SOFTMAXES)),
                repeat=draw(st.sampled_from(REPEATS if shape.kv_heads == 1 else REPEATS[:2])),
                # bmm flattens heads into the batch: a per-head sink is then per batch row (unsupported)
                sink=product != "bmm" and draw(st.booleans()), dtype=draw(dtypes()),
                seed=draw(st.integers(0, 2 ** 16)))


def _check(case, policy):
    fn = make_attention(case["shape"], case["spec"], product=case["product"], scale_at=case["scale_at"],
                        softmax=case["softmax"], repeat=case["repeat"], sink=case["sink"])
    args = make_inputs(case["shape"], case["spec"], case["dtype"], case["seed"], sink=case["sink"])
    report = assert_rewrites(fn, args, pass_name="attention", policy=policy)
    (site,) = [r for r in report.rewrites if r.op == "attention"]
    return report, site


@given(attention_cases())
def test_attention_rewrite_reference(case):
    report, site = _check(case, "reference")
    spec, shape = case["spec"], case["shape"]
    # A causal/window band that masks anything must be folded, never materialised as a bias.
    offset = shape.keys - shape.queries
    masks_something = offset < shape.keys - 1 or (spec.window or shape.keys) < shape.keys
    # (bmm: a mask reshaped into its [B*H] batch folds only when it is all constant)
    constant_mask = not (spec.padding or spec.topk)
    if spec.causal and masks_something and (case["product"] != "bmm" or constant_mask):
        assert "band" in site.detail, report
    if spec.topk and spec.style in ("additive_inf", "additive_min") and case["product"] != "bmm":
        assert "top-" in site.detail, report
    if case["sink"]:
        assert "sink" in site.detail, report


@given(attention_cases())
def test_attention_rewrite_triton_interpreter(case):
    case["spec"] = dataclasses.replace(case["spec"], topk=None)  # index masks: the sparse kernels
    report, site = _check(case, "triton;strict")
    assert site.backend == "triton", report


def test_repeated_keys_are_not_materialised():
    shape = AttentionShape(1, 4, 2, 5, 5, 8, 8)
    fn = make_attention(shape, MaskSpec(causal=True), product="matmul", scale_at="scores_mul",
                        softmax="dtype_fp32", repeat="repeat_kv", sink=False)
    args = make_inputs(shape, MaskSpec(causal=True), torch.float32, 0, sink=False)
    gm, report = rewrite(fn, args)
    assert report.count("attention") == 1
    (call,) = [n for n in gm.graph.nodes if n.target is torch.ops.dsgraph.attention.default]
    assert list(call.args[1].meta["val"].shape) == [1, 2, 5, 8]  # k keeps its 2 kv heads
    assert not any(n.target is torch.ops.aten.expand.default for n in gm.graph.nodes)


def test_mqa_einsum_query_dim_is_the_one_aligned_with_the_keys():
    """In "bshc,btc->bsht" (MLA's absorbed form) both s and h are query-only dims: s is the query dim
    (it sits where t sits in k), so the causal mask folds into a band instead of a per-head bias."""
    def fn(q, k):
        S = q.shape[1]
        mask = torch.full((S, S), float("-inf")).triu(1)
        scores = torch.einsum("bshc,btc->bsht", q, k) * 0.3 + mask.unsqueeze(-2)
        return torch.einsum("bsht,btc->bshc", scores.softmax(-1), k)

    args = [torch.randn(2, 6, 3, 8, requires_grad=True), torch.randn(2, 6, 8, requires_grad=True)]
    report = assert_rewrites(fn, args, pass_name="attention")
    (site,) = [r for r in report.rewrites if r.op == "attention"]
    assert "S=6 T=6" in site.detail and "band" in site.detail and "bias" not in site.detail, report


def test_probabilities_used_elsewhere_are_left_alone():
    def fn(q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2), -1)
        return p @ v, p.sum(-2)

    args = [torch.randn(1, 2, 4, 8) for _ in range(3)]
    gm, report = rewrite(fn, args)
    assert report.count("attention") == 0
    assert any("also used" in s.reason for s in report.skipped), report
    torch.testing.assert_close(gm(*args)[0], fn(*args)[0])


def test_learned_bias_is_not_folded():
    def fn(q, k, v, bias):
        return torch.softmax(q @ k.transpose(-1, -2) + bias, -1) @ v

    args = [torch.randn(1, 2, 4, 8) for _ in range(3)] + [torch.randn(1, 2, 4, 4, requires_grad=True)]
    _, report = rewrite(fn, args)
    assert report.count("attention") == 0
    assert any("requires grad" in s.reason for s in report.skipped), report


def test_verify_rolls_back_a_wrong_rewrite(monkeypatch):
    """A kernel that computes the wrong thing is caught at compile time and rolled back."""
    from dsgraph import registry
    from dsgraph.kernels.attention_ref import attention_ref, attention_ref_backward

    def wrong(q, k, v, **kw):
        out, lse = attention_ref(q, k, v, **kw)
        return out * 2, lse

    bad = registry.KernelImpl("attention", "torch", wrong, attention_ref_backward, lambda *a, **k: None)
    monkeypatch.setitem(registry._KERNELS["attention"], "torch", bad)

    def fn(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v

    args = [torch.randn(1, 2, 4, 8) for _ in range(3)]
    gm, report = rewrite(fn, args, verify=True)
    (site,) = report.rewrites
    assert site.verified is False and site.rolled_back and report.count("attention") == 0
    assert "MISMATCH" in str(report)
    torch.testing.assert_close(gm(*args), fn(*args))


def test_strict_policy_names_the_backend_and_reason():
    def fn(q, k, v, idx):
        S, T = q.shape[2], k.shape[2]
        mask = torch.full((q.shape[0], S, T), float("-inf")).scatter_(-1, idx, 0)
        return torch.softmax(q @ k.transpose(-1, -2) + mask[:, None], -1) @ v

    args = [torch.randn(1, 2, 4, 8) for _ in range(3)] + [torch.zeros(1, 4, 2, dtype=torch.long)]
    with pytest.raises(dsgraph.BackendUnavailableError, match="triton: .*top-?k"):
        rewrite(fn, args, policy="triton;strict")
    _, report = rewrite(fn, args, policy="triton")  # not strict: next backend, reason reported
    (site,) = [r for r in report.rewrites if r.op == "attention"]
    assert site.backend == "torch" and "triton" in site.rejected


def test_sdpa_backend_emits_pytorchs_own_op():
    """Where SDPA can express a site, the rewrite is PyTorch's SDPA op (forward and backward native)."""
    shape = AttentionShape(2, 4, 2, 6, 6, 8, 8)
    fn = make_attention(shape, MaskSpec(causal=False), product="einsum_bhsd", scale_at="on_q",
                        softmax="dtype_fp32", repeat="repeat_interleave", sink=False)
    args = make_inputs(shape, MaskSpec(), torch.float32, 0, sink=False)
    report = assert_rewrites(fn, args, pass_name="attention", policy="auto")
    (site,) = [r for r in report.rewrites if r.op == "attention"]
    assert site.backend == "sdpa", report
    gm, _ = rewrite(fn, args, policy="auto")
    assert any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)
