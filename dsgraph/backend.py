"""``optimize()``, ``explain()`` and the ``torch.compile(backend="dsgraph")`` backend."""
from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from . import ops  # noqa: F401  (registers the dsgraph:: ops and their kernels)
from .capture import requires_grad_nodes, trace_aten
from .pipeline import Pass, run_passes
from .policy import Policy, resolve_policy
from .report import Report

log = logging.getLogger("dsgraph")


def default_passes() -> list[Pass]:
    from dsgraph.passes import default_passes as passes
    return passes()


def dsgraph_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Optional[dict] = None,
                    mode: Optional[str] = None):
    """A torch.compile backend: trace to ATen, run the passes, hand the rest to Inductor.

    ``options`` (from ``torch.compile(..., options=...)``): ``policy`` (Policy or preset name),
    ``verify`` (bool), ``report`` (a Report to fill), ``passes`` (list of Pass; default: all).
    """
    options = dict(options or {})
    unknown = set(options) - {"policy", "verify", "report", "passes"}
    if unknown:
        raise ValueError(f"unknown dsgraph option(s) {sorted(unknown)}; accepted: policy, verify, report, passes")
    policy = resolve_policy(options.get("policy"))
    report: Report = options.get("report") or Report()
    report.policy_name, report.residual = policy.name, policy.residual
    report.graphs += 1
    passes = options.get("passes") or default_passes()

    aten_gm = trace_aten(gm, example_inputs)
    input_grads = [isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs]
    requires_grad = frozenset(requires_grad_nodes(aten_gm.graph, input_grads))
    run_passes(aten_gm, passes, policy, report, verify=bool(options.get("verify")),
               graph_id=report.graphs, requires_grad=requires_grad)
    log.info("dsgraph: graph %d: %d op(s) after rewriting, residual -> %s",
             report.graphs, len(aten_gm.graph.nodes), policy.residual)
    if policy.residual == "eager":
        return aten_gm
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(aten_gm, example_inputs, mode=mode) if mode else compile_fx(aten_gm, example_inputs)


class _OptimizedFunction:
    def __init__(self, fn, compiled, report):
        functools.update_wrapper(self, fn)
        self._compiled = compiled
        self.dsgraph_report = report

    def __call__(self, *args, **kwargs):
        return self._compiled(*args, **kwargs)


def optimize(model_or_fn: Callable, *, policy: "Policy | str" = "auto", verify: bool = False,
             passes: Optional[Sequence[Pass]] = None):
    """Compile ``model_or_fn`` with dsgraph's rewrites.

    Given an ``nn.Module``, returns an ``nn.Module`` that shares its parameters, buffers and
    ``state_dict`` keys (a shallow copy whose calls go through the compiler; the original is left
    unchanged). Given a function, returns a callable. Compilation happens at the first call (and
    again for new shapes); ``dsgraph.explain(result)`` then tells what was rewritten.
    """
    if not callable(model_or_fn):
        raise TypeError(f"optimize() takes an nn.Module or a function, got {type(model_or_fn).__name__}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")
    resolved = resolve_policy(policy)  # validate now, not at the first call
    report = Report()
    report.policy_name, report.residual = resolved.name, resolved.residual
    options = {"policy": resolved, "verify": verify, "report": report}
    if passes is not None:
        options["passes"] = list(passes)
    backend = functools.partial(dsgraph_backend, options=options)
    if isinstance(model_or_fn, torch.nn.Module):
        module = copy.copy(model_or_fn)  # shares _parameters/_buffers/_modules: same state_dict
        module.compile(backend=backend, dynamic=False)
        module.dsgraph_report = report
        return module
    return _OptimizedFunction(model_or_fn, torch.compile(model_or_fn, backend=backend, dynamic=False), report)


def explain(optimized) -> Report:
    """The :class:`Report` of an object returned by :func:`optimize`."""
    report = getattr(optimized, "dsgraph_report", None)
    if report is None:
        raise TypeError("explain() takes what dsgraph.optimize() returned "
                        f"(got {type(optimized).__name__} without a dsgraph report)")
    return report
