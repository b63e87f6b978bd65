"""Policy ``"autotune"`` and its on-disk cache: miss (measure, store), hit (no measuring), corrupt
files and entries (ignored with a warning, measured again, rewritten), stale entries, the key, the
report, and ``"auto"`` taking a cached choice. The timer is injected, so none of this needs a GPU;
the last test autotunes a real site on the GPU."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import dsgraph
from dsgraph import autotune
from dsgraph.policy import Policy
from dsgraph.registry import choose
from dsgraph.testing import rewrite


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path))
    return tmp_path


class FakeTimer:
    """Fixed times per backend; records what it was asked to time."""

    def __init__(self, times):
        self.times, self.calls = dict(times), []

    def __call__(self, op, backend, args, requires_grad, best_ms):
        self.calls.append((op, backend, requires_grad))
        time = self.times[backend]
        if isinstance(time, Exception):
            raise time
        return time


def _causal_site(seq=16, dtype=torch.float32):
    q = torch.randn(1, 4, seq, 16, dtype=dtype)
    kv = torch.randn(1, 2, seq, 16, dtype=dtype)
    return dict(q=q, k=kv, v=kv, sink=None, bias=None, topk=None, scale=0.25, lower=None, upper=0)


TIMES = {"sdpa": 3.0, "triton": 1.0, "torch": 9.0}  # CPU under TRITON_INTERPRET=1: these three serve it


def _tune(policy="autotune", timer=None, site=None, requires_grad=False):
    timer = timer or FakeTimer(TIMES)
    with autotune.use_timer(timer):
        choice = choose("attention", Policy.parse(policy), "site.py:1", requires_grad=requires_grad,
                              **(site or _causal_site()))
    return choice, timer


def _entries(cache_dir):
    return json.loads((cache_dir / "autotune.json").read_text())["entries"]


def test_miss_measures_every_candidate_and_caches_the_fastest(cache_dir):
    choice, timer = _tune(requires_grad=True)
    assert [c[1] for c in timer.calls] == ["sdpa", "triton", "torch"]  # flex: no CUDA, not timed
    assert all(grad for *_, grad in timer.calls)  # a site that needs gradients is timed fwd+bwd
    assert choice.backend == "triton" and choice.timings == TIMES and choice.tuning_note == "measured"
    assert choice.rejected["sdpa"] == "slower (3 ms)"
    order = Policy.preset("auto").backends_for("attention")
    assert list(choice.rejected) == list(order[:order.index("triton")])  # those before the winner
    (entry,) = _entries(cache_dir).values()
    assert entry["backend"] == "triton" and entry["timings"] == TIMES
    assert not list(cache_dir.glob("*.tmp"))  # the atomic write left no temporary file


def test_hit_uses_the_cache_without_timing_and_auto_reads_it():
    _tune()
    for policy in ("autotune", "auto"):
        choice, timer = _tune(policy, timer=FakeTimer({}))
        assert timer.calls == [] and choice.backend == "triton" and choice.tuning_note == "cached"
        assert choice.timings == TIMES
    # Without a cached choice "auto" keeps its order (sdpa first) and measures nothing.
    choice, timer = _tune("auto", timer=FakeTimer({}), site=_causal_site(seq=24))
    assert choice.backend == "sdpa" and timer.calls == [] and choice.timings == {}
    # A policy that names the op's backends is never tuned.
    choice, _ = _tune("auto;attention=sdpa,triton", timer=FakeTimer({}))
    assert choice.backend == "sdpa" and choice.tuning_note == ""


def test_key_separates_shapes_dtypes_strides_grad_and_versions(monkeypatch):
    base = _causal_site()
    key = autotune.cache_key("attention", base, False)
    transposed = dict(base, q=base["q"].transpose(1, 2).contiguous().transpose(1, 2))
    variants = [dict(base, q=torch.randn(1, 4, 17, 16)), dict(base, q=base["q"].half()), transposed,
                dict(base, upper=None), dict(base, scale=0.5)]
    keys = {autotune.cache_key("attention", v, False) for v in variants}
    keys |= {autotune.cache_key("attention", base, True), autotune.cache_key("indexer_scores", base, False)}
    assert key not in keys and len(keys) == len(variants) + 2
    monkeypatch.setattr(autotune, "versions", lambda: {"torch": "0.0"})
    assert autotune.cache_key("attention", base, False) != key


def test_corrupt_file_is_ignored_with_a_warning_and_rewritten(cache_dir, caplog):
    (cache_dir / "autotune.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="dsgraph"):
        choice, timer = _tune()
    assert "ignoring corrupt cache" in caplog.text
    assert len(timer.calls) == 3 and choice.backend == "triton"
    assert [e["backend"] for e in _entries(cache_dir).values()] == ["triton"]


@pytest.mark.parametrize("bad", [
    {"backend": "sdpa"},                                                    # no timings
    {"backend": "sdpa", "timings": {"sdpa": "fast"}},                       # not a time
    {"backend": "sdpa", "timings": {"sdpa": 5.0, "triton": 1.0}},           # not the fastest
    {"backend": "sdpa", "timings": {"sdpa": float("nan")}},
    ["triton"],
])
def test_corrupt_entry_is_never_trusted(cache_dir, caplog, bad):
    _tune()
    entries = _entries(cache_dir)
    (key,) = entries
    (cache_dir / "autotune.json").write_text(json.dumps({"format": 1, "entries": {key: bad}}))
    with caplog.at_level(logging.WARNING, logger="dsgraph"):
        choice, _ = _tune("auto", timer=FakeTimer({}))
    assert choice.backend == "sdpa" and "ignoring the cached choice" in caplog.text  # auto: its order
    choice, timer = _tune()  # autotune measures again and rewrites the entry
    assert choice.backend == "triton" and len(timer.calls) == 3
    assert _entries(cache_dir)[key]["backend"] == "triton"


def test_stale_entry_whose_backend_cannot_serve_the_site_is_measured_again(cache_dir, caplog):
    _tune()
    ((key, entry),) = _entries(cache_dir).items()
    entry.update(backend="flex", timings={"flex": 0.1, **TIMES})  # flex cannot serve a CPU site
    (cache_dir / "autotune.json").write_text(json.dumps({"format": 1, "entries": {key: entry}}))
    with caplog.at_level(logging.WARNING, logger="dsgraph"):
        choice, timer = _tune()
    assert "its backend flex cannot serve the site now" in caplog.text
    assert choice.backend == "triton" and len(timer.calls) == 3


def test_failed_candidate_loses_with_its_reason_and_no_timer_means_policy_order(cache_dir):
    choice, _ = _tune(timer=FakeTimer({**TIMES, "triton": RuntimeError("out of resources")}))
    assert choice.backend == "sdpa"
    assert choice.timings["triton"].startswith("failed (RuntimeError: out of resources")
    # The real timer on CPU: nothing measured, nothing cached, the report says why.
    choice = choose("attention", Policy.preset("autotune"), "site.py:1", **_causal_site(seq=20))
    assert choice.backend == "sdpa" and choice.tuning_note == "autotune: no GPU, the policy's order"
    assert len(_entries(cache_dir)) == 1


def _causal_attention(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    seq = q.shape[2]
    scores = scores + torch.full((seq, seq), float("-inf"), device=q.device).triu(1)
    return torch.softmax(scores.float(), -1).to(v.dtype) @ v


def test_report_shows_every_candidates_time_and_the_graph_runs_the_winner():
    args = [torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3)]
    with autotune.use_timer(FakeTimer(TIMES)):
        gm, report = rewrite(_causal_attention, args, policy="autotune")
    (site,) = [r for r in report.rewrites if r.op == "attention"]
    assert site.backend == "triton" and site.timings == TIMES and site.tuning == "measured"
    assert "autotune (measured): sdpa 3 ms, triton 1 ms, torch 9 ms" in str(report)
    assert "sdpa: slower (3 ms)" in str(report)
    assert [n.args[-1] for n in gm.graph.nodes if n.target is torch.ops.dsgraph.attention.default] == ["triton"]
    out = gm(*args)
    torch.testing.assert_close(out, _causal_attention(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["window+sink", "causal"])
def test_autotune_times_a_real_site_gpu(cache_dir, case):
    """On the GPU: every backend that serves the site is timed forward + backward, the fastest wins
    and is cached, ``"auto"`` then takes it, and the result equals eager."""
    from test_attention_flex import window_sink
    torch.manual_seed(0)
    heads = (16, 16, 16) if case == "causal" else (32, 8, 8)  # _causal_attention has no repeat_kv
    args = [torch.randn(1, h, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in heads]
    if case == "causal":
        fn, expected = _causal_attention, {"sdpa", "triton", "flex", "torch"}
    else:
        fn, expected = window_sink(512), {"triton", "flex", "torch"}
        args.append(torch.randn(32, device="cuda", requires_grad=True))
    opt = dsgraph.optimize(fn, policy="autotune")
    out = opt(*args)
    print(dsgraph.explain(opt))
    (site,) = [r for r in dsgraph.explain(opt).rewrites if r.op == "attention"]
    timed = {b: t for b, t in site.timings.items() if isinstance(t, float)}
    assert expected <= set(timed), site.timings
    assert site.backend == min(timed, key=timed.get) and site.tuning == "measured"
    torch.testing.assert_close(out, fn(*args), atol=2e-2, rtol=2e-2)  # bf16 output
    opt2 = dsgraph.optimize(fn, policy="auto")
    opt2(*args)
    (again,) = [r for r in dsgraph.explain(opt2).rewrites if r.op == "attention"]
    assert again.backend == site.backend and again.tuning == "cached"


def test_timing_inputs_have_the_sites_layout():
    fake_like = [torch.randn(2, 5, 3).transpose(0, 1), torch.randn(4, 1).expand(4, 6),
                 torch.zeros(2, 3, dtype=torch.int64)]
    for fake in fake_like:
        real = autotune._materialize(fake, requires_grad=True)
        assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype)
        assert real.requires_grad == fake.dtype.is_floating_point
    assert not autotune._materialize(torch.randn(3), requires_grad=False).requires_grad


def test_runners_are_timed_compiled_with_their_gradients_past_dynamos_recompile_limit(monkeypatch):
    """What autotune times is the runner compiled alone (the graph's per-call CPU cost included): its
    backward is compiled with its forward (lazily, on a GPU, it compiled in autograd's device thread
    while the compiling thread held Dynamo's compile lock: a deadlock), it computes the runner's
    gradients, and every (shape, grad mode) is compiled, past Dynamo's default limit of 8 entries per
    code object (beyond it the fullgraph compile raises). Lengths no other test compiles."""
    import torch._inductor.compile_fx as compile_fx
    from torch._dynamo.utils import counters

    from dsgraph.registry import kernel
    backward_compiles = []
    compile_backward = compile_fx.compile_fx_backward
    monkeypatch.setattr(compile_fx, "compile_fx_backward",
                        lambda *a, **kw: backward_compiles.append(1) or compile_backward(*a, **kw))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # a cache hit compiles nothing
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    run = kernel("attention", "torch").run
    site = _causal_site(seq=100)
    real = {name: autotune._materialize(v, requires_grad=True) for name, v in site.items()}
    leaves = [real[name] for name in ("q", "k", "v")]
    with autotune.compiling_runners():
        out = autotune._compiled(run)(**real)  # the forward alone
        assert backward_compiles, "the backward was left to compile lazily"
        grads = autotune.timing_step(run, real, requires_grad=True)()
    expected = torch.autograd.grad(run(**real).sum(), leaves)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    del out
    compiled_before = counters["stats"]["unique_graphs"]
    shapes = range(101, 101 + 10)  # 10 > Dynamo's default recompile_limit
    with autotune.compiling_runners():
        for seq in shapes:
            site = {name: autotune._materialize(v, requires_grad=False)
                    for name, v in _causal_site(seq).items()}
            autotune.timing_step(run, site, requires_grad=False)()
    assert counters["stats"]["unique_graphs"] - compiled_before == len(shapes)
