"""Testing tools for graph rewrites, ours and yours.

- :func:`assert_rewrites`: traces a function, runs passes, and checks BOTH that a given pass rewrote
  at least ``min_count`` sites AND that outputs and gradients equal the eager function's. A pattern
  that silently fails to match fails the assertion instead of passing as "equivalent".
- :func:`assert_left_alone`: its negative counterpart, for near misses a pass must not touch.
- Hypothesis strategies: :func:`attention_shapes`, :func:`dtypes`, :func:`masks` (with
  :func:`eager_mask`, which writes a mask the way eager code does, in several styles) and
  :func:`model_configs`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch
from hypothesis import strategies as st

from .capture import requires_grad_nodes, trace_aten
from .pipeline import Pass, run_passes
from .policy import Policy, resolve_policy
from .report import Report
from .verify import assert_equivalent

__all__ = ["capture", "rewrite", "assert_rewrites", "assert_left_alone", "assert_equivalent", "AttentionShape", "attention_shapes",
           "dtypes", "MaskSpec", "masks", "eager_mask", "model_configs"]


def capture(fn: Callable, *args) -> torch.fx.GraphModule:
    """The ATen graph dsgraph's passes see for ``fn(*args)`` (static shapes)."""
    return trace_aten(fn, args)


def rewrite(fn: Callable, args: Sequence[Any], *, passes: Optional[Sequence[Pass]] = None,
            policy: "Policy | str" = "reference", verify: bool = False):
    """Trace ``fn`` and run the passes on it, without torch.compile. Returns ``(graph_module, report)``;
    the graph module is callable with the same arguments and differentiable."""
    from dsgraph.passes import default_passes
    policy = resolve_policy(policy)
    gm = trace_aten(fn, args)
    requires_grad = frozenset(requires_grad_nodes(
        gm.graph, [isinstance(a, torch.Tensor) and a.requires_grad for a in args]))
    report = Report()
    report.policy_name, report.residual, report.graphs = policy.name, "eager", 1
    run_passes(gm, list(passes) if passes is not None else default_passes(), policy, report,
               verify=verify, graph_id=1, requires_grad=requires_grad)
    return gm, report


def assert_rewrites(fn: Callable, args: Sequence[Any], *, pass_name: str, min_count: int = 1,
                    passes: Optional[Sequence[Pass]] = None, policy: "Policy | str" = "reference",
                    grads: bool = True, seed: int = 0, cancellation_atol: tuple[float, float] = (0.0, 0.0)) -> Report:
    """Assert that ``pass_name`` rewrote at least ``min_count`` sites of ``fn`` and that the rewritten
    graph's outputs (and, with ``grads``, the gradients of every input that requires grad) equal
    eager ``fn``'s. Returns the report.

    Low-precision sites that miss the dtype's tolerance must be no less accurate than eager against
    ``fn`` run in float64 (2x eager's error plus one ulp of the largest value). ``cancellation_atol``
    (outputs, gradients) widens that bound where the test knows the result cancels: float64 does not
    round the low-precision intermediates both graphs read (a bf16 projection, say), so their
    rounding, amplified by the cancellation, lands differently in each graph."""
    gm, report = rewrite(fn, args, passes=passes, policy=policy)
    count = report.count(pass_name)
    assert count >= min_count, (
        f"pass {pass_name!r} rewrote {count} site(s), expected at least {min_count}\n{report}")
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    low = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16)]
    precision = low[0] if low else None  # fp32 results computed through low-precision ops
    expected = fn(*args)
    actual = _unwrap(gm(*args), expected)
    pairs = [("outputs", _flat(actual), _flat(expected))]
    if grads and leaves:
        cotangents = _cotangents(expected, seed)
        pairs.append(("gradients", _grads(actual, expected, leaves, cotangents),
                      _grads(expected, expected, leaves, cotangents)))
    for what, got, want in pairs:
        message = f"{what} differ after {pass_name} rewrote {count} site(s)"
        try:
            assert_equivalent(got, want, message, precision=precision)
        except AssertionError:
            if precision is None:
                raise
            # Low precision: eager's own rounding can exceed the tolerance (e.g. a bf16-rounded
            # reduction into an fp32 gradient). Then the rewrite must be no less accurate than eager
            # against the same function computed in float64.
            exact = _float64_run(fn, args, expected, leaves, grads, seed)[0 if what == "outputs" else 1]
            _assert_no_worse(got, want, exact, message, cancellation_atol[what == "gradients"])
    return report


def _cotangents(expected, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=generator).to(o) for o in _flat(expected)
            if isinstance(o, torch.Tensor) and o.requires_grad]


def _grads(outputs, expected, leaves, cotangents):
    outs = [a for a, e in zip(_flat(outputs), _flat(expected)) if isinstance(e, torch.Tensor) and e.requires_grad]
    return list(torch.autograd.grad(outs, leaves, cotangents, allow_unused=True))


def _float64_run(fn, args, expected, leaves, grads, seed):
    wide = [a.detach().double().requires_grad_(a.requires_grad)
            if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    out = fn(*wide)
    wide_leaves = [w for a, w in zip(args, wide) if isinstance(a, torch.Tensor) and a.requires_grad]
    cot = [c.double() for c in _cotangents(expected, seed)]
    return _flat(out), (_grads(out, out, wide_leaves, cot) if grads and leaves else [])


def assert_left_alone(fn: Callable, args: Sequence[Any], *, pass_name: str, op: str,
                      passes: Optional[Sequence[Pass]] = None, policy: "Policy | str" = "reference") -> Report:
    """Assert that ``pass_name`` rewrote no site of ``fn``, that no ``dsgraph::op`` is in the graph, and
    that the graph still computes eager ``fn``'s outputs. Returns the report (its skipped sites)."""
    gm, report = rewrite(fn, args, passes=passes, policy=policy)
    assert report.count(pass_name) == 0, f"pass {pass_name!r} rewrote a site it should leave alone\n{report}"
    target = getattr(torch.ops.dsgraph, op).default
    assert not any(n.target is target for n in gm.graph.nodes), f"dsgraph::{op} is in the graph\n{report}"
    expected = fn(*args)
    assert_equivalent(_flat(_unwrap(gm(*args), expected)), _flat(expected),
                      f"the graph {pass_name} left alone computes differently")
    return report


def _assert_no_worse(got, want, exact, message, atol=0.0):
    for g, w, x in zip(got, want, exact):
        if g is None:
            continue
        g_dtype = g.dtype if g.is_floating_point() else torch.float32
        g, w, x = g.double(), w.double(), x.double()
        assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{message}: NaN in different places"
        keep = torch.isfinite(x)
        err_got = (g - x)[keep].abs().max().item() if keep.any() else 0.0
        err_eager = (w - x)[keep].abs().max().item() if keep.any() else 0.0
        scale = x[keep].abs().max().item() if keep.any() else 1.0
        # 2x eager's error, plus one ulp of the largest value in the result's dtype (at least 2^-9 of it, for
        # fp32 results of low-precision ops): two chains that round the same intermediates (say a bf16
        # dscore before a bf16 matmul) can land on either side of the exact value's nearest bf16
        slack = max(2 ** -9, torch.finfo(g_dtype).eps) * scale + atol
        assert err_got <= 2 * err_eager + slack, (
            f"{message}: error vs float64 {err_got:.3g} > 2 x eager's {err_eager:.3g} + {slack:.3g}")


def _unwrap(actual, expected):
    # make_fx graphs return a flat tuple; a function returning one tensor gets it back alone
    if isinstance(expected, torch.Tensor) and isinstance(actual, (tuple, list)) and len(actual) == 1:
        return actual[0]
    return actual


def _flat(x):
    if isinstance(x, (tuple, list)):
        return [y for item in x for y in _flat(item)]
    return [x]


# --- strategies -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionShape:
    batch: int
    q_heads: int
    kv_heads: int
    queries: int
    keys: int
    head_dim: int
    value_dim: int

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads


@st.composite
def attention_shapes(draw, *, max_batch: int = 2, max_kv_heads: int = 3, max_group: int = 3,
                     max_seq: int = 24, head_dims: Sequence[int] = (8, 16), cross: bool = True,
                     value_dims: bool = True) -> AttentionShape:
    """[B, Hq, S, D] / [B, Hkv, T, D] shapes: GQA groups, S != T (``cross``), Dv != D (``value_dims``)."""
    kv_heads = draw(st.integers(1, max_kv_heads))
    group = draw(st.integers(1, max_group))
    queries = draw(st.integers(1, max_seq))
    keys = draw(st.integers(1, max_seq)) if cross else queries
    head_dim = draw(st.sampled_from(list(head_dims)))
    value_dim = draw(st.sampled_from(list(head_dims))) if value_dims else head_dim
    return AttentionShape(draw(st.integers(1, max_batch)), kv_heads * group, kv_heads, queries, keys,
                          head_dim, value_dim)


def dtypes(half: bool = True) -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from([torch.float32, torch.bfloat16] if half else [torch.float32])


MASK_STYLES = ("additive_inf", "additive_min", "masked_fill", "where")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """A mask as eager code builds it: ``causal`` (aligned to the last key, as with a KV cache),
    a sliding ``window`` (keys i-window < j <= i), ``padding`` from a [B, T] attention_mask,
    ``topk`` indices per query, written in ``style`` and by ``builder`` (how the band is computed)."""

    causal: bool = False
    window: Optional[int] = None
    padding: bool = False
    topk: Optional[int] = None
    style: str = "additive_inf"
    builder: str = "triu"

    @property
    def empty(self) -> bool:
        return not (self.causal or self.window or self.padding or self.topk)


@st.composite
def masks(draw, *, topk: bool = True, padding: bool = True, max_window: int = 8) -> MaskSpec:
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(1, max_window)))
    return MaskSpec(causal=causal or window is not None, window=window,
                    padding=padding and draw(st.booleans()),
                    topk=draw(st.one_of(st.none(), st.integers(1, 6))) if topk else None,
                    style=draw(st.sampled_from(MASK_STYLES)),
                    builder=draw(st.sampled_from(("triu", "arange"))))


def eager_mask(spec: MaskSpec, queries: int, keys: int, *, device=None,
               attention_mask: Optional[torch.Tensor] = None,
               topk_index: Optional[torch.Tensor] = None):
    """Build the mask of ``spec`` the way model code does. Returns ``(kind, tensor)``: ``kind`` is
    ``"add"`` (add to the scores) or ``"blocked"`` / ``"allowed"`` (a bool for masked_fill / where),
    the tensor broadcastable to [B, H, S, T] (None when the spec masks nothing)."""
    offset = keys - queries  # the queries are the last ``queries`` positions
    allowed = None
    if spec.causal:
        if spec.builder == "triu":
            allowed = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(offset)
            if spec.window is not None:
                allowed = allowed & ~torch.ones(queries, keys, dtype=torch.bool, device=device).tril(
                    offset - spec.window)
        else:
            i = torch.arange(queries, device=device)[:, None] + offset
            j = torch.arange(keys, device=device)[None, :]
            allowed = j <= i
            if spec.window is not None:
                allowed = allowed & (i - j < spec.window)
        allowed = allowed[None, None]
    if spec.padding:
        assert attention_mask is not None, "padding masks need attention_mask [B, T]"
        keep = attention_mask[:, None, None, :].bool()
        allowed = keep if allowed is None else allowed & keep
    if spec.topk is not None:
        assert topk_index is not None, "topk masks need topk_index [B, S, K]"
        topk_add = torch.full((topk_index.shape[0], queries, keys), float("-inf"),
                              device=device).scatter_(-1, topk_index, 0)[:, None]
    else:
        topk_add = None
    if allowed is None:
        return ("add", topk_add) if topk_add is not None else ("add", None)
    fill = float("-inf") if spec.style != "additive_min" else torch.finfo(torch.float32).min
    if spec.style in ("additive_inf", "additive_min"):
        mask = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, fill)
        return "add", mask if topk_add is None else mask + topk_add
    if topk_add is not None:
        allowed = allowed & (topk_add == 0)
    return ("blocked", ~allowed) if spec.style == "masked_fill" else ("allowed", allowed)


def model_configs(base: Any, **fields: st.SearchStrategy) -> st.SearchStrategy:
    """Variations of a config dataclass: ``model_configs(Cfg.tiny(), n_heads=st.sampled_from([2, 4]))``."""
    if not dataclasses.is_dataclass(base):
        raise TypeError(f"model_configs takes a dataclass instance, got {type(base).__name__}")
    names = {f.name for f in dataclasses.fields(base)}
    unknown = set(fields) - names
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not fields of {type(base).__name__}")
    return st.fixed_dictionaries(fields).map(lambda values: dataclasses.replace(base, **values))
