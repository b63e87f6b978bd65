"""``optimize()``, ``explain()`` and the ``torch.compile(backend="dsgraph")`` backend."""
from __future__ import annotations

import contextlib
import functools
import logging
import types
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


def _saved_tensors_hooks_off():
    """Saved-tensor hooks (``torch.utils.checkpoint``'s, when the compiled module runs under
    activation checkpointing) must not see the tensors our tracing and ``verify`` save: the first
    forward would then save more tensors than its recomputation and checkpoint raises. AOTAutograd
    traces under the same guard."""
    off = getattr(torch._dynamo.utils, "_disable_saved_tensors_hooks_during_tracing", None)
    return off() if off is not None else contextlib.nullcontext()


def _reject_checkpointed_regions(gm: fx.GraphModule) -> None:
    """``torch.utils.checkpoint`` traced by Dynamo is a higher-order op whose body the passes cannot
    see into (nor trace pre-dispatch): say how to compose instead of failing inside the tracer."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and "activation_checkpoint" in str(getattr(node.target, "__name__", node.target)):
            raise NotImplementedError(
                "dsgraph: the optimized module runs torch.utils.checkpoint inside the compiled region "
                f"({node.target}); apply activation checkpointing around the optimized module instead: "
                "checkpoint_wrapper(dsgraph.optimize(block)) (see README, Distributed training)")


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

    _reject_checkpointed_regions(gm)
    with _saved_tensors_hooks_off():
        aten_gm = trace_aten(gm, example_inputs)
        input_grads = [isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs]
        requires_grad = frozenset(requires_grad_nodes(aten_gm.graph, input_grads))
        run_passes(aten_gm, passes, policy, report, verify=bool(options.get("verify")),
                   graph_id=report.graphs, requires_grad=requires_grad)
    log.info("dsgraph: graph %d: %d op(s) after rewriting, residual -> %s",
             report.graphs, len(aten_gm.graph.nodes), policy.residual)
    _carry_dynamo_input_marks(gm, aten_gm)
    if policy.residual == "eager":
        return _recording_served(aten_gm, example_inputs, report)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx
    if policy.cudagraphs and mode in (None, "default"):
        mode = "reduce-overhead"
    compiled = compile_fx(aten_gm, example_inputs, config_patches=list_mode_options(mode) if mode else None)
    return _recording_served(compiled, example_inputs, report)


def _carry_dynamo_input_marks(dynamo_gm: fx.GraphModule, aten_gm: fx.GraphModule) -> None:
    """Put Dynamo's marks on our re-traced graph's inputs (one per Dynamo input, in order): which are
    parameters and buffers, whose addresses stay fixed. AOTAutograd reads them from the graph it is
    given; without them CUDA graphs (``Policy.cudagraphs``) copied every parameter into the graph's
    input buffers at each replay."""
    if "dynamo_compile_id" not in dynamo_gm.meta:
        return
    dynamo_inputs = dynamo_gm.graph.find_nodes(op="placeholder")
    aten_inputs = aten_gm.graph.find_nodes(op="placeholder")
    if len(dynamo_inputs) != len(aten_inputs) or next(aten_gm.parameters(), None) is not None:
        log.debug("dsgraph: the traced graph's inputs do not match Dynamo's: no input is marked static "
                  "(under CUDA graphs every input is copied at each replay)")
        return
    from torch._dynamo.source import ConstantSource
    aten_gm.meta["dynamo_compile_id"] = dynamo_gm.meta["dynamo_compile_id"]
    # The tensor constants make_fx lifted (``_tensor_constant0``, ...) are buffers AOTAutograd looks up
    # by name too.
    aten_gm._param_name_to_source = {**getattr(dynamo_gm, "_param_name_to_source", {}),
                                     **{name: ConstantSource(name) for name, _ in aten_gm.named_buffers()}}
    for ours, theirs in zip(aten_inputs, dynamo_inputs):
        ours._dynamo_source = getattr(theirs, "_dynamo_source", None)
        if "tensor_dict" in theirs.meta:
            ours.meta["tensor_dict"] = theirs.meta["tensor_dict"]


def _recording_served(compiled, example_inputs: Sequence[Any], report: Report):
    """``compiled``, noting in ``report.served`` each module of the optimized model it runs for: the
    parameters it is called with name it (``optimize`` gives the report their names)."""
    names: dict = getattr(report, "_parameter_names", {})
    slots = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
    if not names or not slots:
        return compiled
    graph, seen = report.graphs, set()

    def run(*args):
        if id(args[slots[0]]) not in seen:  # once per module: a set lookup per call
            seen.add(id(args[slots[0]]))
            paths = [names[id(args[i])].split(".") for i in slots if id(args[i]) in names]
            if paths:
                common = paths[0][:-1]
                for path in paths[1:]:
                    while path[:len(common)] != common:
                        common = common[:-1]
                report.served.setdefault(graph, []).append(".".join(common))
        return compiled(*args)
    return run


class _OptimizedFunction:
    def __init__(self, fn, compiled, report):
        functools.update_wrapper(self, fn)
        self._compiled = compiled
        self.dsgraph_report = report

    def __call__(self, *args, **kwargs):
        return self._compiled(*args, **kwargs)


def _shallow_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object of the same class sharing ``module.__dict__``'s values (``_parameters``,
    ``_buffers``, ``_modules`` and the hook dicts: same parameters, same ``state_dict`` keys).

    Not ``copy.copy``: it goes through ``cls.__new__``, which ``fully_shard``'s ``FSDPModule``
    overrides to construct (and ``__init__``) the unsharded class. A module managed by a composable
    distributed API (``fully_shard``, ``replicate``, composable ``checkpoint``) finds its state by
    module identity, so the copy is registered under the same state: ``copy.unshard()``,
    ``copy.set_requires_gradient_sync(...)`` act on the original's parameters."""
    clone = object.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    if torch.distributed.is_available():
        from torch.distributed._composable_state import _get_module_state, _insert_module_state
        state = _get_module_state(module)
        if state is not None and _get_module_state(clone) is None:
            _insert_module_state(clone, state)
    return clone


def _compile_module(module: torch.nn.Module, backend) -> None:
    """``module.compile``, except for torch.nn's own modules (``nn.Sequential``, ...): Dynamo skips
    their frames, so their calls are traced from a frame of Dynamo's own that inlines them, as
    ``torch.compile(module)`` does (without it the whole module would silently run eager)."""
    from torch._dynamo import trace_rules
    from torch._dynamo.external_utils import wrap_inline
    if isinstance(module.forward, types.MethodType) and trace_rules.check(module.forward):
        module._compiled_call_impl = torch.compile(wrap_inline(module._call_impl), backend=backend, dynamic=False)
    else:
        module.compile(backend=backend, dynamic=False)


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
        module = _shallow_copy(model_or_fn)  # shares _parameters/_buffers/_modules: same state_dict
        _compile_module(module, backend)
        module.dsgraph_report = report
        report._parameter_names = {id(p): name for name, p in module.named_parameters()}
        return module
    return _OptimizedFunction(model_or_fn, torch.compile(model_or_fn, backend=backend, dynamic=False), report)


def explain(optimized) -> Report:
    """The :class:`Report` of an object returned by :func:`optimize`."""
    report = getattr(optimized, "dsgraph_report", None)
    if report is None:
        raise TypeError("explain() takes what dsgraph.optimize() returned "
                        f"(got {type(optimized).__name__} without a dsgraph report)")
    return report
