"""Compile-time verification: run a rewrite and the subgraph it replaces on the same random inputs."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily


def assert_equivalent(actual, expected, msg: str = "", *, precision: torch.dtype | None = None) -> None:
    """``torch.testing.assert_close`` with its per-dtype defaults; NaN equals NaN (an all-masked row
    is NaN in eager too). For bf16/fp16 (the outputs' dtype, or ``precision`` when the computation
    ran in it, e.g. an fp32 gradient reached through bf16 ops) the absolute tolerance scales with
    the output: eager rounds intermediates (scores, probabilities) to the low precision and a fused
    kernel does not, so two correct results differ by ~eps x |largest term|, not ~eps x |element|."""
    for a, e in zip(_flat(actual), _flat(expected)):
        if a is None or e is None:
            assert a is None and e is None, f"{msg}: one side has no value ({a is None}, {e is None})"
            continue
        kw = {}
        low = precision if precision in (torch.bfloat16, torch.float16) else e.dtype
        if low in (torch.bfloat16, torch.float16) and e.numel():
            finite = e[torch.isfinite(e)].float()
            scale = finite.abs().max().item() if finite.numel() else 1.0
            tol = 1.6e-2 if low == torch.bfloat16 else 1e-3  # assert_close's rtol for the dtype
            kw = dict(rtol=tol, atol=tol * max(scale, 1e-3))
        torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"{msg}\n{m}" if msg else m, **kw)


def _flat(x):
    if isinstance(x, (tuple, list)):
        return [y for item in x for y in _flat(item)]
    return [x]


def subgraph_module(gm: fx.GraphModule, inputs: Sequence[fx.Node], output: fx.Node) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The part of ``gm`` that computes ``output`` from ``inputs`` (placeholders reached on the way
    become extra inputs). Returns the module and its input nodes in the original graph."""
    inputs = list(dict.fromkeys(inputs))
    stop = set(inputs)
    needed: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        if node.op == "placeholder":
            inputs.append(node)
            stop.add(node)
            continue
        needed.append(node)
        stack.extend(node.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(needed, key=order.__getitem__):
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[output])
    return fx.GraphModule(gm, graph), inputs


def random_like(val: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random data of a fake tensor's shape, dtype and device. Integers are drawn in {0, 1}: valid
    as index positions and as 0/1 padding masks."""
    shape, device = tuple(val.shape), val.device
    if val.dtype == torch.bool:
        return torch.rand(shape, generator=generator).lt(0.5).to(device)
    if not val.dtype.is_floating_point:
        return torch.randint(0, 2, shape, generator=generator).to(device=device, dtype=val.dtype)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=val.dtype)


def check_rewrite(gm: fx.GraphModule, inputs: Sequence[fx.Node], old: fx.Node, new: fx.Node,
                  seed: int = 0) -> str | None:
    """None if ``new`` computes what ``old`` computes on random inputs; else the mismatch."""
    old_mod, old_inputs = subgraph_module(gm, inputs, old)
    new_mod, new_inputs = subgraph_module(gm, old_inputs, new)
    generator = torch.Generator().manual_seed(seed)
    with unset_fake_temporarily(), torch.no_grad():
        values = {n: random_like(n.meta["val"], generator) for n in dict.fromkeys([*old_inputs, *new_inputs])}
        expected = old_mod(*[values[n] for n in old_inputs])
        actual = new_mod(*[values[n] for n in new_inputs])
        try:
            assert_equivalent(actual, expected)
        except AssertionError as exc:
            return " ".join(line.strip() for line in str(exc).strip().splitlines()[:4]) or "mismatch"
    return None
