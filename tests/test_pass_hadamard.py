"""The Hadamard pass: every way of writing scale * x H_n is rewritten, and computes the same forward
and backward; anything that is not exactly a Hadamard over blocks the code formed is left alone."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import dsgraph
import dsgraph.ops.hadamard  # noqa: F401  (registers dsgraph::hadamard)
from dsgraph.kernels.hadamard_tilelang import sylvester
from dsgraph.models import DeepseekV32Config, DeepseekV32ForCausalLM, hadamard_transform_torch
from dsgraph.passes.hadamard import MAX_PROBED_ROW, MAX_ROW, HadamardPass
from dsgraph.testing import assert_rewrites, rewrite

PASSES = [HadamardPass()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def butterfly(x, scale, where):
    """hadamard_transform_torch with the scale before, after, or as a division; math in the input
    dtype or upcast to fp32."""
    n = x.shape[-1]
    y = x * scale if where == "before" else x
    y = y.unsqueeze(-1)
    for _ in range(n.bit_length() - 1):
        even, odd = y[..., ::2, :], y[..., 1::2, :]
        y = torch.cat((even + odd, even - odd), dim=-1)
    y = y.squeeze(-2)
    return y / (1 / scale) if where == "divide" else y * scale if where == "after" else y


def recursive_halves(x):
    """[a; b] -> [H(a + b); H(a - b)] with view/unbind."""
    if x.shape[-1] == 1:
        return x
    a, b = x.view(*x.shape[:-1], 2, x.shape[-1] // 2).unbind(-2)
    return torch.cat((recursive_halves(a + b), recursive_halves(a - b)), -1)


def recursive_interleaved(x):
    """Even/odd split, interleaved output: H_{n/2} ⊗ H_2, the same Sylvester matrix."""
    if x.shape[-1] == 1:
        return x
    a, b = x[..., ::2], x[..., 1::2]
    return torch.stack((recursive_interleaved(a + b), recursive_interleaved(a - b)), -1).flatten(-2)


FORMS = {
    "butterfly_fp32": lambda x, s, w: hadamard_transform_torch(x, s) if w == "after"
    else butterfly(x.float(), s, w).to(x.dtype),
    "butterfly_native": lambda x, s, w: butterfly(x, s, w),
    "halves": lambda x, s, w: recursive_halves(x * s) if w == "before" else recursive_halves(x) * s,
    "interleaved": lambda x, s, w: recursive_interleaved(x) / (1 / s) if w == "divide" else recursive_interleaved(x) * s,
    # The matrix is a constant of the function (a get_attr after tracing), the scale folded in.
    "matmul": lambda x, s, w: x @ (sylvester(x.shape[-1], torch.float32, x.device) * s).to(x.dtype),
    "linear": lambda x, s, w: F.linear(x, sylvester(x.shape[-1], x.dtype, x.device)) * s,
    "mm": lambda x, s, w: torch.mm(x.reshape(-1, x.shape[-1]),
                                   sylvester(x.shape[-1], x.dtype, x.device) * s).view(x.shape),
}


@st.composite
def sites(draw):
    n = 2 ** draw(st.integers(1, 6))
    lead = draw(st.lists(st.integers(1, 3), min_size=0 if draw(st.booleans()) else 1, max_size=3))
    form = draw(st.sampled_from(sorted(FORMS)))
    if form == "mm":
        lead = lead or [2]
    return (form, n, lead, draw(st.sampled_from(DTYPES)), draw(st.sampled_from([1.0, 0.5, -0.3, n ** -0.5])),
            draw(st.sampled_from(["before", "after", "divide"])), draw(st.integers(0, 2 ** 16)))


@given(sites())
def test_every_written_form_is_rewritten_and_computes_the_same(site):
    form, n, lead, dtype, scale, where, seed = site
    x = torch.randn(*lead, n, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_()
    report = assert_rewrites(lambda t: FORMS[form](t, scale, where), [x], pass_name="hadamard", passes=PASSES)
    assert report.count("hadamard") == 1, report
    assert report.rewrites[0].detail.startswith(f"H_{n} "), report


@given(st.integers(1, 3), st.sampled_from([2, 4, 8]), st.sampled_from([4, 16]), st.sampled_from(DTYPES))
def test_a_rotation_of_heads_uses_the_head_view(batch, heads, dim, dtype):
    """x [B, H*D] viewed as heads [B, H, D] then rotated: H_D on the view, not H_{H*D}."""
    x = torch.randn(batch, heads * dim).to(dtype).requires_grad_()
    fn = lambda t: hadamard_transform_torch(t.view(batch, heads, dim), dim ** -0.5)  # noqa: E731
    report = assert_rewrites(fn, [x], pass_name="hadamard", passes=PASSES)
    assert report.rewrites[0].detail.startswith(f"H_{dim} on {batch * heads} row(s) of ({batch}, {heads}, {dim})")


def _flip_one_sign(x):
    h = sylvester(x.shape[-1], x.dtype, x.device)
    h[1, 2] = -h[1, 2]  # in place, through a view: the traced constant is mutated after it is built
    return x @ h


def _partial_butterfly(x):
    y = x.unsqueeze(-1)
    for _ in range(x.shape[-1].bit_length() - 2):  # one round short
        even, odd = y[..., ::2, :], y[..., 1::2, :]
        y = torch.cat((even + odd, even - odd), dim=-1)
    return y.squeeze(-2)


def _swapped_halves(x):
    if x.shape[-1] == 1:
        return x
    a, b = x.view(*x.shape[:-1], 2, x.shape[-1] // 2).unbind(-2)
    return torch.cat((_swapped_halves(a - b), _swapped_halves(a + b)), -1)  # a signed permutation of H


def _walsh_order(x):
    n = x.shape[-1]
    h = sylvester(n, x.dtype, x.device)
    changes = (h[:, 1:] != h[:, :-1]).sum(1)
    return x @ h[changes.argsort()]  # sequency order: rows permuted


def _written_in_place(x):
    y = x.unsqueeze(-1)
    for step in range(3):
        even, odd = y[..., ::2, :], y[..., 1::2, :]
        y = torch.cat((even + odd, even - odd), dim=-1)
        if step == 0:
            y[..., 0, 0] = 0  # through a view, mid-butterfly: the result is no Hadamard
    return y.squeeze(-2)


NEGATIVES = {
    "one sign flipped": _flip_one_sign,
    "one sign flipped, out of place": lambda x: x @ (sylvester(8, x.dtype, x.device) * FLIP),
    "partial butterfly": _partial_butterfly,
    "swapped halves": _swapped_halves,
    "walsh (sequency) order": _walsh_order,
    "blockwise matrix the code never split": lambda x: x @ torch.block_diag(*[sylvester(x.shape[-1] // 2, x.dtype, x.device)] * 2),
    "affine round": lambda x: torch.cat((x[..., ::2] + x[..., 1::2] + 1, x[..., ::2] - x[..., 1::2]), -1),
    "written in place": _written_in_place,
    "rows mixed": lambda x: torch.cat((x[::2] + x[1::2], x[::2] - x[1::2]), 0),
    "non power of 2": lambda x: x[..., :6] @ torch.tensor([[1.0, 1, 1, 1, 1, 1], [1, -1, 1, -1, 1, -1], [1, 1, -1, -1, 1, 1],
                                                            [1, -1, -1, 1, 1, -1], [1, 1, 1, 1, -1, -1], [1, -1, 1, -1, -1, 1]]),
    "random orthogonal": lambda x: x @ ORTHOGONAL,
}
FLIP = torch.ones(8, 8).index_put_((torch.tensor(3), torch.tensor(5)), torch.tensor(-1.0))
ORTHOGONAL = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))[0]


@pytest.mark.parametrize("name", sorted(NEGATIVES))
def test_what_is_not_exactly_a_hadamard_is_left_alone(name):
    x = torch.randn(4, 8)
    gm, report = rewrite(NEGATIVES[name], [x], passes=PASSES)
    assert report.count("hadamard") == 0, report
    assert not any(n.target is torch.ops.dsgraph.hadamard.default for n in gm.graph.nodes)
    out = gm(x)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, NEGATIVES[name](x))


def test_a_matrix_that_is_a_parameter_is_left_alone():
    h = torch.nn.Parameter(sylvester(8, torch.float32, "cpu"))
    _, report = rewrite(lambda x, w: x @ w, [torch.randn(3, 8), h], passes=PASSES)
    assert report.count("hadamard") == 0


def test_interior_rounds_used_elsewhere_stay_and_the_rotation_is_still_rewritten():
    def fn(x):
        y = x.unsqueeze(-1)
        first = None
        for _ in range(3):
            even, odd = y[..., ::2, :], y[..., 1::2, :]
            y = torch.cat((even + odd, even - odd), dim=-1)
            first = y if first is None else first
        return y.squeeze(-2), first.sum()

    x = torch.randn(5, 8, requires_grad=True)
    assert_rewrites(fn, [x], pass_name="hadamard", passes=PASSES)


def test_rows_beyond_the_exact_check_are_checked_on_probes():
    # float64: in fp32 the 13 rounds of the eager butterfly drift past assert_close's fp32 tolerance
    x = torch.randn(2, 2 * MAX_ROW, dtype=torch.float64, requires_grad=True)
    report = assert_rewrites(lambda t: hadamard_transform_torch(t, 0.5), [x], pass_name="hadamard", passes=PASSES)
    assert report.rewrites[0].detail.startswith(f"H_{2 * MAX_ROW} on 2 row(s)")


def _last_round_off(x):
    """The butterfly with its last round's differences doubled: linear, close in form, no Hadamard."""
    y = x.unsqueeze(-1)
    rounds = x.shape[-1].bit_length() - 1
    for step in range(rounds):
        even, odd = y[..., ::2, :], y[..., 1::2, :]
        y = torch.cat((even + odd, even - (2 * odd if step == rounds - 1 else odd)), dim=-1)
    return y.squeeze(-2)


@pytest.mark.parametrize("fn", [_last_round_off, _partial_butterfly],
                         ids=lambda f: f.__name__)
def test_probed_rows_that_are_not_a_hadamard_are_left_alone(fn):
    x = torch.randn(2, 2 * MAX_ROW)
    gm, report = rewrite(fn, [x], passes=PASSES)
    assert report.count("hadamard") == 0, report
    torch.testing.assert_close(gm(x), fn(x))


def test_rows_beyond_the_probed_size_are_reported_as_skipped():
    x = torch.randn(1, 2 * MAX_PROBED_ROW)
    _, report = rewrite(lambda t: hadamard_transform_torch(t), [x], passes=PASSES)
    assert report.count("hadamard") == 0
    assert any(f"{2 * MAX_PROBED_ROW} > {MAX_PROBED_ROW}" in s.reason for s in report.skipped), report.skipped


def test_verify_checks_the_rewrite():
    x = torch.randn(3, 16)
    gm, report = rewrite(lambda t: hadamard_transform_torch(t, 0.25), [x], passes=PASSES, verify=True)
    assert report.rewrites[0].verified is True and not report.rewrites[0].rolled_back
    torch.testing.assert_close(gm(x), hadamard_transform_torch(x, 0.25))


def test_every_layer_of_tiny_deepseek_v32_has_its_rotations_and_indexer_rewritten():
    """The issue's done-when: explain(optimize(tiny V3.2)) lists the Hadamard and indexer rewrites of
    every layer (all default passes, as a user gets them)."""
    config = DeepseekV32Config.tiny()
    assert config.use_sparse_attention
    torch.manual_seed(0)
    model = DeepseekV32ForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    # The MoE's bincount breaks the graph: "eager" residual keeps the test at a few seconds.
    opt = dsgraph.optimize(model, policy="reference;residual=eager")
    logits = opt(ids).logits
    report = dsgraph.explain(opt)
    rotations = [r for r in report.rewrites if r.op == "hadamard" and not r.rolled_back]
    assert len(rotations) == 2 * config.num_hidden_layers, report
    per_graph = {}
    for r in rotations:
        per_graph.setdefault(r.graph, []).append(r.detail)
    for details in per_graph.values():  # q: [B, S, heads, Di]; k: [B, S, 1, Di]
        assert sorted(d.split(" on ")[1].split(" row")[0] for d in details) == \
            sorted([str(2 * 8), str(2 * 8 * config.index_n_heads)]), details
    indexers = [r for r in report.rewrites if r.op == "indexer_topk" and not r.rolled_back]
    assert len(indexers) == config.num_hidden_layers and {r.graph for r in indexers} == set(per_graph), report
    torch.testing.assert_close(logits, model(ids).logits)


def test_the_policy_picks_the_kernel_and_says_why_not_the_others():
    x = torch.randn(4, 32)
    gm, report = rewrite(lambda t: hadamard_transform_torch(t, 0.5), [x], passes=PASSES, policy="auto")
    (r,) = report.rewrites
    torch.testing.assert_close(gm(x), hadamard_transform_torch(x, 0.5))
    assert r.backend in ("triton", "torch")
    assert "tilelang" in r.rejected and "CUDA" in r.rejected["tilelang"] or r.backend == "tilelang"
    assert math.isclose(float(r.detail.rsplit("scale ", 1)[1]), 0.5)
