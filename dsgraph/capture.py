"""Capture: a Dynamo graph (or a plain function) -> an ATen-level FX graph the passes rewrite.

The graph is traced pre-dispatch (above autograd), so the rewritten graph is what AOTAutograd then
differentiates: every ``dsgraph::`` op carries its own backward, and one rewrite serves the forward
and the backward of the joint graph Inductor compiles.
"""
from __future__ import annotations

import inspect
import os
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from .fxutil import VIEW_OPS

aten = torch.ops.aten

# In-place ops the model code uses while building masks and scores (`scores *= scale`,
# `mask.triu_(1)`, `full(...).scatter_(...)`): rewritten to their functional forms so passes match
# one form.
_FUNCTIONAL = {
    aten.add_.Tensor: aten.add.Tensor, aten.add_.Scalar: aten.add.Scalar,
    aten.sub_.Tensor: aten.sub.Tensor, aten.mul_.Tensor: aten.mul.Tensor,
    aten.mul_.Scalar: aten.mul.Scalar, aten.div_.Tensor: aten.div.Tensor,
    aten.div_.Scalar: aten.div.Scalar, aten.triu_.default: aten.triu.default,
    aten.tril_.default: aten.tril.default, aten.scatter_.value: aten.scatter.value,
    aten.scatter_.src: aten.scatter.src, aten.masked_fill_.Scalar: aten.masked_fill.Scalar,
    aten.masked_fill_.Tensor: aten.masked_fill.Tensor, aten.fill_.Scalar: aten.fill.Scalar,
    aten.clamp_.default: aten.clamp.default, aten.neg_.default: aten.neg.default,
    aten.exp_.default: aten.exp.default,
}


def trace_aten(fn: Callable, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Trace ``fn`` (a Dynamo GraphModule or any function of tensors) to a pre-dispatch ATen graph
    with static shapes, then rewrite safe in-place ops to functional ones."""
    fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [
        x if isinstance(x, torch._subclasses.FakeTensor)
        else fake_mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x
        for x in example_inputs
    ]
    # A Dynamo graph carries the user's source lines in its node meta; a plain function needs them
    # recorded while tracing.
    if isinstance(fn, fx.GraphModule):
        graph_module, record = fn, {}
        fn = lambda *args: fx.Interpreter(graph_module).run(*args)  # noqa: E731  (carries node meta over)
    else:
        record = {"record_stack_traces": True} if _RECORDS_TRACES else {}
    with fake_mode, fx.traceback.preserve_node_meta():
        gm = make_fx(fn, pre_dispatch=True, record_module_stack=True, **record)(*fake_inputs)
    functionalize_inplace(gm.graph)
    gm.recompile()
    return gm


_RECORDS_TRACES = "record_stack_traces" in inspect.signature(make_fx).parameters


def _functional_dtype(functional, node: fx.Node) -> torch.dtype:
    """The dtype ``functional`` returns for ``node``'s arguments (run on meta tensors)."""
    def meta(a):
        v = a.meta.get("val") if isinstance(a, fx.Node) else a
        return torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v
    args, kwargs = torch.utils._pytree.tree_map(meta, (node.args, node.kwargs))
    return functional(*args, **kwargs).dtype


def functionalize_inplace(graph: fx.Graph) -> int:
    """Replace ``y = x.op_(...)`` by ``y = op(x, ...)`` where that is safe: ``x`` is a fresh
    intermediate (not an input, not a view of anything) with no alias taken before the mutation.
    Later uses of ``x`` read ``y``. Returns how many ops were rewritten."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    rewritten = 0
    for node in list(graph.nodes):
        functional = _FUNCTIONAL.get(node.target) if node.op == "call_function" else None
        if functional is None:
            continue
        base = node.args[0]
        if not isinstance(base, fx.Node) or base.op != "call_function" or base.target in VIEW_OPS:
            continue
        if base.target in _FUNCTIONAL or base.target in (operator.getitem,):
            continue
        earlier = [u for u in base.users if u is not node and order[u] < order[node]]
        if any(u.target in VIEW_OPS for u in earlier):
            continue  # an alias read before the mutation would see the old value; leave it
        mutated = node.meta.get("val")
        if not isinstance(mutated, torch.Tensor) or _functional_dtype(functional, node) != mutated.dtype:
            continue  # bf16 `x += fp32` stays bf16 in place; the functional form would promote
        with graph.inserting_before(node):
            new = graph.call_function(functional, node.args, node.kwargs)
        new.meta = dict(node.meta)
        order[new] = order[node]
        for user in [u for u in base.users if u not in (node, new) and order[u] > order[node]]:
            user.replace_input_with(base, new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


def requires_grad_nodes(graph: fx.Graph, input_requires_grad: Sequence[bool]) -> set[fx.Node]:
    """Which nodes carry gradient, following grad-mode switches and detaches in the graph."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    result: set[fx.Node] = {p for p, rg in zip(placeholders, input_requires_grad) if rg}
    grad_enabled = torch.is_grad_enabled()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch._C._set_grad_enabled:
            grad_enabled = bool(node.args[0])
            continue
        if not grad_enabled or node.target is aten.detach.default:
            continue
        if any(a in result for a in node.all_input_nodes):
            val = node.meta.get("val")
            if isinstance(val, (tuple, list)) or (isinstance(val, torch.Tensor) and val.is_floating_point()):
                result.add(node)
    return result


_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def location(node: fx.Node) -> str:
    """Module path and source line of a node, for the report."""
    stack = node.meta.get("nn_module_stack") or {}
    module = ""
    if stack:
        path = list(stack.values())[-1]
        module = path[0] if isinstance(path, tuple) else str(path)
        module = module.replace("L['self'].", "").replace("L['fn'].", "")
    trace = node.meta.get("stack_trace") or ""
    line = ""
    for frame in reversed(trace.strip().splitlines()):
        frame = frame.strip()
        if frame.startswith("File ") and not any(p in frame for p in _LIBRARY_DIRS):
            file_part, _, rest = frame.partition(", line ")
            line = f"{file_part[6:-1].rsplit('/', 1)[-1]}:{rest.split(',')[0]}"
            break
    return " ".join(p for p in (module, line) if p) or node.name

