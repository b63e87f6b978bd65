"""Small FX helpers the passes share: insert a node with its fake value, walk through casts and
views, read constants."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily

aten = torch.ops.aten

CASTS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.to.dtype_layout,
         aten.to.device, aten.clone.default, aten.contiguous.default, aten.alias.default}
# Ops whose output aliases their first input: a write into one of them writes the base.
VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.t.default, aten.alias.default,
    aten.detach.default, aten.narrow.default, aten.unflatten.int, aten.flatten.using_ints,
    aten.diagonal.default, aten.as_strided.default, aten.split.Tensor, aten.chunk.default,
    aten.unbind.int, aten.view_as.default, aten.expand_as.default, aten.movedim.int,
}
_NONDETERMINISTIC = {aten.rand.default, aten.randn.default, aten.randint.low, aten.randint.default,
                     aten.empty.memory_format, aten.empty_like.default, aten.bernoulli.default,
                     aten.dropout.default, aten.native_dropout.default, aten.empty_strided.default,
                     aten.rand_like.default, aten.randn_like.default}


def val(node) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def call(graph: fx.Graph, target, *args, like: Optional[fx.Node] = None, **kwargs) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point, with ``meta['val']``
    computed on fake tensors and the source location copied from ``like``."""
    node = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    vals = _tensors((fake_args, fake_kwargs))
    mode = detect_fake_mode(vals) if vals else _graph_fake_mode(graph)
    with mode:
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    if like is not None:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def _tensors(tree) -> list:
    out = []
    fx.node.map_aggregate(tree, lambda x: out.append(x) if isinstance(x, torch.Tensor) else None)
    return out


def _graph_fake_mode(graph: fx.Graph):
    vals = [n.meta["val"] for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    mode = detect_fake_mode(vals)
    if mode is None:
        raise RuntimeError("graph has no fake tensor values; trace it with dsgraph.capture first")
    return mode


def strip(node: fx.Node, targets: Iterable) -> fx.Node:
    """Follow single-input ops in ``targets`` (casts, views) back to their source."""
    targets = set(targets)
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets:
        node = node.args[0]
    return node


def written(node: fx.Node) -> bool:
    """Whether an in-place op writes ``node`` or a view of it (``m[:, 0] = x`` traces to
    ``copy_(select(m))`` in the pre-dispatch graph): readers then see values its own op does not compute."""
    aliases, stack = set(), [node]
    while stack:
        m = stack.pop()
        if m in aliases:
            continue
        aliases.add(m)
        for user in m.users:
            schema = getattr(user.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                return True
            if user.target in VIEW_OPS:
                stack.append(user)
    return False


def is_constant(node, cache: dict) -> bool:
    """True if ``node`` is computed from factory ops and Python constants only (no graph input) and
    neither it nor anything it is computed from is written in place (evaluating the subgraph alone
    would miss the write)."""
    if not isinstance(node, fx.Node):
        return True
    if node in cache:
        return cache[node]
    if node.op == "get_attr":
        result = not written(node)
    elif node.op != "call_function" or node.target in _NONDETERMINISTIC or node.target is torch._C._set_grad_enabled:
        result = False
    else:
        schema = getattr(node.target, "_schema", None)
        mutable = schema is not None and schema.is_mutable
        result = not mutable and not written(node) and all(is_constant(a, cache) for a in node.all_input_nodes)
    cache[node] = result
    return result


def evaluate(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The real value of a constant node (see :func:`is_constant`)."""
    from .verify import subgraph_module
    module, inputs = subgraph_module(gm, [], node)
    assert not inputs, f"{node} is not constant"
    with unset_fake_temporarily(), torch.no_grad():
        return module().detach()  # a get_attr constant may be a tensor that requires grad


def scalar(node, gm: fx.GraphModule, cache: dict) -> Optional[float]:
    """A Python number for a literal or a constant 0-dim tensor node, else None."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if isinstance(node, fx.Node) and is_constant(node, cache):
        v = val(node)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return float(evaluate(gm, node).item())
    return None
