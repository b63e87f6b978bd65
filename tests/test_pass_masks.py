"""The masks pass: every way of writing a band is recognised exactly; anything else is left alone."""
import pytest
import torch
from hypothesis import given, strategies as st

from dsgraph.ops.masks import band_allowed
from dsgraph.passes.masks import MaskPass, classify
from dsgraph.testing import rewrite


@st.composite
def bands(draw):
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    lower = draw(st.one_of(st.none(), st.integers(-12, 12)))
    upper = draw(st.one_of(st.none(), st.integers(-12, 12)))
    return rows, cols, lower, upper


@given(bands(), st.sampled_from(["bool", "blocked", "additive_inf", "additive_min"]))
def test_classify_recovers_any_band(band, form):
    rows, cols, lower, upper = band
    allowed = band_allowed(rows, cols, lower, upper, "cpu")
    value = {"bool": allowed, "blocked": ~allowed,
             "additive_inf": torch.zeros(rows, cols).masked_fill(~allowed, float("-inf")),
             "additive_min": torch.zeros(rows, cols).masked_fill(~allowed, torch.finfo(torch.float32).min)}[form]
    spec = classify(value[None, None], prefer_blocked=form == "blocked")
    if allowed.all() or not allowed.any():
        assert spec is None  # masks nothing / everything: not a band to fold
        return
    assert spec is not None
    r, c, lo, hi, _fill, invert = spec
    assert (r, c) == (rows, cols)
    assert torch.equal(band_allowed(rows, cols, lo, hi, "cpu"), ~value if invert else
                       (value if form == "bool" else value == 0))


@given(st.integers(3, 8), st.integers(3, 8), st.integers(0, 2 ** 16))
def test_classify_rejects_what_is_not_a_band(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, cols, generator=g)
    assert classify(noise) is None  # a bias (ALiBi-like), not a mask
    checker = (torch.arange(rows)[:, None] + torch.arange(cols)[None]) % 2 == 0
    assert classify(checker) is None


WRITERS = {
    "full_triu": lambda S, T, w: torch.full((S, T), float("-inf")).triu(T - S + 1),
    "ones_tril_bool": lambda S, T, w: torch.ones(S, T, dtype=torch.bool).tril(T - S),
    "arange_window": lambda S, T, w: ((torch.arange(T)[None] <= torch.arange(S)[:, None] + T - S)
                                      & (torch.arange(S)[:, None] + T - S - torch.arange(T)[None] < w)),
    "where_min": lambda S, T, w: torch.where(torch.ones(S, T).tril(T - S) > 0, 0.0, torch.finfo(torch.float32).min),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@given(st.integers(1, 10), st.integers(0, 6), st.integers(1, 5))
def test_written_masks_fold_and_compute_the_same(writer, queries, extra_keys, window):
    keys = queries + extra_keys

    def fn(x):
        mask = WRITERS[writer](queries, keys, window)
        return mask * 1.0 + x if mask.dtype != torch.bool else torch.where(mask, x, 0.0)

    x = torch.randn(queries, keys)
    gm, report = rewrite(fn, [x], passes=[MaskPass()])
    allowed = WRITERS[writer](queries, keys, window)
    allowed = allowed if allowed.dtype == torch.bool else allowed == 0
    folds = bool(not allowed.all() and allowed.any())
    assert report.count("masks") == int(folds), report
    if folds:
        assert any(n.target is torch.ops.dsgraph.band_mask.default for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), fn(x))


def test_topk_scatter_becomes_an_index_mask():
    def fn(scores, idx):
        return scores + torch.full(scores.shape, float("-inf")).scatter_(-1, idx, 0)

    scores, idx = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5, 3))
    gm, report = rewrite(fn, [scores, idx], passes=[MaskPass()])
    assert report.count("masks") == 1 and report.rewrites[0].op == "topk_mask"
    torch.testing.assert_close(gm(scores, idx), fn(scores, idx))


def test_classify_in_row_chunks(monkeypatch):
    """Large masks are checked a few rows at a time: the same answers with chunks of 7 elements."""
    import dsgraph.passes.masks as masks
    monkeypatch.setattr(masks, "CHUNK_ELEMENTS", 7)
    for rows, cols, lower, upper in [(9, 9, None, 0), (5, 12, -3, 7), (12, 5, -2, 1), (6, 6, 0, 0), (7, 3, None, -1)]:
        allowed = band_allowed(rows, cols, lower, upper, "cpu")
        additive = torch.zeros(rows, cols).masked_fill(~allowed, float("-inf"))
        assert classify(additive) == (rows, cols, lower, upper, float("-inf"), False)
        assert classify(allowed) == (rows, cols, lower, upper, 0.0, False)
        broken, row = additive.clone(), int(allowed.any(1).nonzero().max())
        keys = allowed[row].nonzero().flatten()
        broken[row, keys[len(keys) // 2]] = float("-inf")  # a hole in the last chunk's band
        assert classify(broken) is None
    two_fills = torch.zeros(4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    two_fills[0, 3] = -1e9
    assert classify(two_fills) is None


def _causal(scores):
    return scores + torch.full(scores.shape[-2:], float("-inf"), device=scores.device).triu(1)


def test_masks_above_the_evaluation_limit_are_skipped_with_the_reason(monkeypatch):
    import dsgraph.passes.masks as masks
    monkeypatch.setattr(masks, "MAX_EVAL_ELEMENTS", 16)
    scores = torch.randn(6, 6)
    gm, report = rewrite(_causal, [scores], passes=[MaskPass()])
    assert report.count("masks") == 0
    assert any("not evaluated at compile time" in s.reason and "GiB free" in s.reason for s in report.skipped), report
    torch.testing.assert_close(gm(scores), _causal(scores))


@pytest.mark.gpu
def test_masks_above_the_cpu_limit_are_evaluated_on_the_gpu(monkeypatch):
    """A 32k x 32k causal mask (2^30 elements) is past the CPU limit: on a GPU with room it is folded."""
    import dsgraph.passes.masks as masks
    monkeypatch.setattr(masks, "MAX_EVAL_ELEMENTS", 16)
    scores = torch.randn(6, 6, device="cuda")
    gm, report = rewrite(_causal, [scores], passes=[MaskPass()])
    assert report.count("masks") == 1 and report.rewrites[0].op == "band_mask", report
    torch.testing.assert_close(gm(scores), _causal(scores))


def test_constants_that_are_not_masks_are_left_alone():
    def fn(x):
        positions = torch.arange(6)[:, None] * torch.arange(4)[None].float()  # a RoPE-like table
        return x + positions.sin()

    gm, report = rewrite(lambda x: fn(x), [torch.randn(6, 4)], passes=[MaskPass()])
    assert report.count("masks") == 0


def test_a_mask_written_in_place_through_a_view_is_not_taken_for_its_band():
    """``mask[:, 0] = -inf`` traces to ``copy_(select(mask))``: evaluating the ``triu`` alone would
    call it causal and drop the write."""
    def attend(q, k, v):
        seq = q.shape[-2]
        mask = torch.full((seq, seq), float("-inf")).triu(1)
        mask[:, 0] = float("-inf")
        mask[0, 0] = 0.0
        scores = (q @ k.transpose(-1, -2)) * 0.25 + mask
        return torch.softmax(scores.float(), -1) @ v

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    gm, report = rewrite(attend, (q, k, v))
    assert report.count("masks") == 0 and report.count("attention") == 1  # the mask stays a bias
    torch.testing.assert_close(gm(q, k, v), attend(q, k, v))
