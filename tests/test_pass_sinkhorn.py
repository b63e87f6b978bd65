"""The Sinkhorn pass on captured graphs: every way of writing the loop is rewritten to one dsgraph::sinkhorn
with the iterations counted, and computes eager's outputs and gradients (torch and Triton kernels);
chains outside the op are left alone with the reason; each Hyper-Connection site of a DeepSeek V4
block is rewritten."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

import dsgraph
from dsgraph.models import DeepseekV4Config, DeepseekV4ForCausalLM
from dsgraph.models.deepseek_v4 import rope_freqs_cis, sinkhorn_normalize
from dsgraph.passes import SinkhornPass
from dsgraph.testing import rewrite

PASSES = [SinkhornPass()]
OP = torch.ops.dsgraph.sinkhorn.default


def written(x, iters, eps, *, row_first=False, trailing_row=False, dims="negative", apply="div",
            eps_side="right", softmax="method", upcast=False):
    """The Sinkhorn loop as a user may write it (the defaults are DeepSeek V4's ``sinkhorn_normalize``)."""
    rank = x.dim()
    row, col = (-1, -2) if dims == "negative" else (rank - 1, rank - 2)

    def plus_eps(t):
        if eps == 0.0 and eps_side == "none":  # eps 0 written as no eps at all
            return t
        return t + eps if eps_side in ("right", "none") else eps + t

    def normalise(c, dim):
        total = plus_eps(c.sum(dim=dim, keepdim=True))
        return {"div": lambda: c / total, "reciprocal": lambda: c * (1 / total),
                "method": lambda: total.reciprocal() * c, "pow": lambda: c * total.pow(-1)}[apply]()

    if softmax == "dtype":  # F.softmax(..., dtype=float32) of the narrow logits
        p = F.softmax(x, dim=rank - 1, dtype=torch.float32)
    else:
        x = x.float() if upcast else x
        p = x.softmax(-1) if softmax == "method" else torch.softmax(x, dim=rank - 1)
    c = plus_eps(p)
    if row_first:
        c = normalise(c, row)
    c = normalise(c, col)
    for _ in range(iters - 1):
        c = normalise(normalise(c, row), col)
    return normalise(c, row) if trailing_row else c


@st.composite
def sites(draw):
    m, iters = draw(st.integers(1, 8)), draw(st.integers(1, 25))
    lead = draw(st.lists(st.integers(1, 3), max_size=3))
    eps = draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.5]))
    # bf16 logits cast up (``.float()`` or the softmax's dtype): the op reads them as they are
    low = draw(st.booleans())
    style = dict(row_first=draw(st.booleans()), trailing_row=draw(st.booleans()),
                 dims=draw(st.sampled_from(["negative", "positive"])),
                 apply=draw(st.sampled_from(["div", "reciprocal", "method", "pow"])),
                 eps_side=draw(st.sampled_from(["right", "left", "none"])),
                 softmax=draw(st.sampled_from(["dtype", "method", "function"] if low else ["method", "function"])),
                 upcast=low)
    # Triton (the interpreter on CPU) for powers of two; other M are not its sites
    backend = draw(st.sampled_from(["torch", "triton"])) if m & (m - 1) == 0 else "torch"
    return m, iters, lead, eps, style, low, backend, draw(st.integers(0, 2 ** 16))


def _flat(out) -> list:
    """A graph's or function's outputs as a list (make_fx graphs may return one tensor as a 1-tuple)."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_rewritten(fn, args, *, iters=None, backend="torch", seed=0):
    """One sinkhorn rewrite (with ``iters`` counted) whose outputs and gradients equal eager's."""
    gm, report = rewrite(fn, args, passes=PASSES, policy="triton" if backend == "triton" else "reference")
    assert report.count("sinkhorn") == 1 and not report.skipped, report
    (node,) = [n for n in gm.graph.nodes if n.target is OP]
    assert iters is None or node.args[1] == iters, (node.args, report)
    assert report.rewrites[0].backend == backend, report
    (got,), want = _flat(gm(*args)), fn(*args)
    torch.testing.assert_close(got, want)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed))
    leaves = [a for a in args if a.requires_grad]
    for g, w in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(g, w)
    return gm, report


@given(sites())
def test_every_written_form_is_one_op_with_its_iterations_counted(site):
    m, iters, lead, eps, style, low, backend, seed = site
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, m, m, generator=gen) * 2).to(torch.bfloat16 if low else torch.float32)
    x.requires_grad_()
    gm, report = assert_rewritten(lambda t: written(t, iters, eps, **style), [x], iters=iters, backend=backend,
                                  seed=seed)
    (node,) = [n for n in gm.graph.nodes if n.target is OP]
    assert node.args[2:] == (eps, backend, style["row_first"]), node.args
    assert node.args[0].op == "placeholder", "the logits are read as given (widening casts folded into the op)"
    assert not any(n.target is torch.ops.aten.softmax.int for n in gm.graph.nodes)
    assert ("trailing row normalisation stays" in report.rewrites[0].detail) == style["trailing_row"], report


def test_the_model_loop_is_rewritten():
    x = torch.randn(2, 5, 4, 4, requires_grad=True)
    _, report = assert_rewritten(lambda t: sinkhorn_normalize(t, 20, 1e-6), [x], iters=20)
    assert report.rewrites[0].detail == "20 iteration(s) on 10 [4, 4] matrices, eps 1e-06, torch.float32 logits"


def test_a_float64_chain_is_served_by_the_reference_and_a_narrowing_softmax_dtype_is_kept():
    x = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    _, report = assert_rewritten(lambda t: sinkhorn_normalize(t, 5, 1e-6), [x], iters=5)
    assert "triton" not in report.rewrites[0].rejected  # the reference policy: torch only
    # softmax(fp64 logits, dtype=float32): the chain is fp32, so the op reads the logits rounded to fp32
    fn = lambda t: written(t, 5, 1e-6, softmax="dtype")  # noqa: E731
    gm, _ = assert_rewritten(fn, [x], iters=5)
    (node,) = [n for n in gm.graph.nodes if n.target is OP]
    assert node.meta["val"].dtype == torch.float32 and node.args[0].meta["val"].dtype == torch.float32


def _normalise(c, dim, eps=1e-6):
    return c / (c.sum(dim, keepdim=True) + eps)


def _mismatched_eps(x):
    c = _normalise(_normalise(x.softmax(-1) + 1e-6, -2), -1)
    return _normalise(c, -2, eps=1e-5)


def _iterate_used_elsewhere(x):
    c = _normalise(x.softmax(-1) + 1e-6, -2)
    mid = _normalise(c, -1)
    return _normalise(mid, -2), mid.sum()


def _sum_used_elsewhere(x):
    c = _normalise(x.softmax(-1) + 1e-6, -2)
    total = c.sum(-1, keepdim=True)
    return _normalise(c / (total + 1e-6), -2), total


def _not_alternating(x):
    return _normalise(_normalise(_normalise(x.softmax(-1) + 1e-6, -2), -2), -1)


def _row_alone(x):
    return _normalise(x.softmax(-1) + 1e-6, -1)


def _negative_eps(x):
    return sinkhorn_normalize(x, 3, -1e-3)


def _bf16_chain(x):
    return sinkhorn_normalize(x.bfloat16(), 3, 1e-6)


def _not_square(x):
    return sinkhorn_normalize(x[..., :3, :], 3, 1e-6)


LEFT_ALONE = {
    "eps differs between steps": (_mismatched_eps, "eps must be one value >= 0 in every step: 1e-06 after the "
                                                   "softmax, 1e-06, 1e-05 in the normalisations"),
    "an iterate used elsewhere": (_iterate_used_elsewhere, "used elsewhere (the iterate after normalisation 2)"),
    "a row sum used elsewhere": (_sum_used_elsewhere, "used elsewhere (the sum or divisor of normalisation 2)"),
    "two column steps in a row": (_not_alternating, "do not alternate between rows (R) and columns (C): CCR"),
    "a row normalisation alone": (_row_alone, "a row normalisation of softmax + eps alone"),
    "negative eps": (_negative_eps, "eps must be one value >= 0"),
    "a bf16 chain": (_bf16_chain, "Sinkhorn computed in torch.bfloat16"),
    "non-square matrices": (_not_square, "non-square [3, 4]"),
}


@pytest.mark.parametrize("name", sorted(LEFT_ALONE))
def test_chains_outside_the_op_are_left_alone_with_the_reason(name):
    fn, reason = LEFT_ALONE[name]
    x = torch.randn(2, 4, 4)
    gm, report = rewrite(fn, [x], passes=PASSES)
    assert report.count("sinkhorn") == 0 and not any(n.target is OP for n in gm.graph.nodes), report
    assert [s.reason for s in report.skipped if reason in s.reason], report.skipped
    torch.testing.assert_close(_flat(gm(x)), _flat(fn(x)))


NOT_SINKHORN = {
    "a softmax": lambda x: x.softmax(-1) + 1e-6,
    "a softmax over the columns": lambda x: _normalise(_normalise(x.softmax(-2) + 1e-6, -2), -1),
    "eps a tensor input": lambda x: _normalise(x.softmax(-1) + x[..., :1, :1], -2),
}


@pytest.mark.parametrize("name", sorted(NOT_SINKHORN))
def test_what_is_not_a_sinkhorn_chain_is_not_touched(name):
    x = torch.randn(2, 4, 4)
    gm, report = rewrite(NOT_SINKHORN[name], [x], passes=PASSES)
    assert report.count("sinkhorn") == 0 and not report.skipped, report
    torch.testing.assert_close(_flat(gm(x)), [NOT_SINKHORN[name](x)])


def test_a_step_the_pass_does_not_read_ends_the_chain_there():
    """A row sum without keepdim is not a step the pass knows: the chain before it is the op, the rest
    stays eager, reading the op's result."""
    def fn(x):
        c = sinkhorn_normalize(x, 3, 1e-6)
        c = c / (c.sum(-1) + 1e-6)[..., None]
        return _normalise(c, -2)
    x = torch.randn(3, 4, 4, requires_grad=True)
    assert_rewritten(fn, [x], iters=3)


def test_verify_checks_the_rewrite():
    x = torch.randn(3, 4, 4)
    gm, report = rewrite(lambda t: sinkhorn_normalize(t, 20, 1e-6), [x], passes=PASSES, verify=True)
    assert report.rewrites[0].verified is True and not report.rewrites[0].rolled_back
    torch.testing.assert_close(_flat(gm(x)), [sinkhorn_normalize(x, 20, 1e-6)])


# --- DeepSeek V4 -----------------------------------------------------------------------------------------------
class _DenseMoE(nn.Module):
    """The V4 MoE with every expert run on every token, weighted by its routing weight (0 where not
    routed): the function of the reference loop without its data-dependent token lists, which make_fx
    cannot trace."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x, input_ids):
        moe, shape = self.moe, x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = moe.gate(x, input_ids.reshape(-1))
        dense = weights.new_zeros(x.shape[0], len(moe.experts)).scatter_add(1, indices, weights)
        y = sum(expert(x, dense[:, i, None]).float() for i, expert in enumerate(moe.experts))
        return (y + moe.shared_experts(x).float()).type_as(x).view(shape)


@pytest.mark.parametrize("policy", ["reference", "triton"])
def test_each_hyper_connection_of_a_v4_block_is_rewritten(policy):
    """One block's graph (attention and MoE, each wrapped in a Hyper-Connection): both hc_pre sites'
    Sinkhorn loops become the op; outputs and the gradients of the input and every parameter match."""
    config = DeepseekV4Config.tiny()
    torch.manual_seed(0)
    block = DeepseekV4ForCausalLM(config).layers[1]  # compressed attention with the indexer
    block.ffn = _DenseMoE(block.ffn)
    B, S = 2, 8
    ids = torch.randint(0, config.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    freqs = rope_freqs_cis(config.inv_freq(True, ids.device), torch.arange(S))
    names = [n for n, _ in block.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(block, dict(zip(names, params)), (x, freqs, ids))

    x = torch.randn(B, S, config.hc_mult, config.hidden_size, requires_grad=True)
    args = [x] + [p.detach().requires_grad_() for p in block.parameters()]
    gm, report = rewrite(fn, args, passes=PASSES, policy=policy)
    sites = [r for r in report.rewrites if r.op == "sinkhorn"]
    assert len(sites) == 2 and not report.skipped, report
    assert all(r.detail.startswith(f"{config.hc_sinkhorn_iters} iteration(s) on {B * S} [4, 4] matrices, eps 1e-06")
               and r.backend == ("torch" if policy == "reference" else "triton") for r in sites), report
    assert len([n for n in gm.graph.nodes if n.target is OP]) == 2
    (got,), want = _flat(gm(*args)), fn(*args)
    torch.testing.assert_close(got, want)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    for g, w in zip(torch.autograd.grad(got, args, grad, allow_unused=True),
                    torch.autograd.grad(want, args, grad, allow_unused=True)):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w)


def test_training_tiny_v4_through_optimize_matches_eager():
    """The one end-to-end test: Dynamo's graphs of the whole model (the MoE's token lists break them),
    every layer's two Hyper-Connection sites rewritten, and a training step equal to eager's."""
    config = DeepseekV4Config.tiny(num_hidden_layers=2, compress_ratios=[0, 4], n_routed_experts=2,
                                   num_experts_per_tok=1)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    opt = dsgraph.optimize(model, policy="triton;residual=eager", passes=[SinkhornPass()])
    out = opt(ids, labels=ids)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    report = dsgraph.explain(opt)
    sites = [r for r in report.rewrites if r.op == "sinkhorn" and not r.rolled_back]
    assert len(report.sites("sinkhorn")) == 2 * config.num_hidden_layers, report
    assert sites and all(r.backend == "triton" for r in sites), report
    want = model(ids, labels=ids)
    torch.testing.assert_close(out.logits, want.logits)
    for got, w in zip(grads, torch.autograd.grad(want.loss, list(model.parameters()), allow_unused=True)):
        assert (got is None) == (w is None)
        if got is not None:
            torch.testing.assert_close(got, w)
