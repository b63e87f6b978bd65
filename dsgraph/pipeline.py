"""The pass pipeline: passes declare what they need and provide; networkx orders them."""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Optional, Sequence

import networkx as nx
import torch.fx as fx

from .capture import location
from .policy import Policy
from .registry import BackendUnavailableError, Choice, choose
from .report import Report, Rewrite, Skip
from .verify import check_rewrite

log = logging.getLogger("dsgraph")


class PipelineError(ValueError):
    """The passes' needs/provides cannot be ordered (a cycle)."""


class Pass:
    """A graph rewrite. Subclasses set ``name``, ``needs`` and ``provides`` (capability names) and
    implement ``run(gm, ctx)``, calling ``ctx.choose`` for each site and ``ctx.commit`` for each
    rewrite (``ctx.skip`` for a recognised site left alone)."""

    name: str = ""
    needs: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, gm: fx.GraphModule, ctx: "PassContext") -> None:
        raise NotImplementedError


@dataclasses.dataclass
class PassContext:
    policy: Policy
    report: Report
    verify: bool = False
    graph_id: int = 0
    requires_grad: frozenset = frozenset()
    pass_name: str = ""
    # The last choice per op, with its autotune timings, for the rewrite that commits it.
    _choices: dict = dataclasses.field(default_factory=dict)
    # Each applied rewrite and the node it inserted: a later pass may replace that node in turn.
    _inserted: list = dataclasses.field(default_factory=list)

    def note_replaced(self, gm: fx.GraphModule) -> None:
        """Mark the rewrites whose inserted node the current pass removed (the graph no longer runs them)."""
        alive = set(gm.graph.nodes)
        for record, node in self._inserted:
            if node not in alive and not record.replaced_by:
                record.replaced_by = self.pass_name

    def choose(self, op: str, node: fx.Node, **args) -> tuple[Optional[str], dict[str, str]]:
        """The backend for ``op`` at ``node``'s site (whose output needs gradients iff ``node``
        does), or ``(None, rejected)`` if none can serve it (strict policies raise instead)."""
        try:
            choice = choose(op, self.policy, location(node), requires_grad=node in self.requires_grad, **args)
        except BackendUnavailableError as exc:
            if self.policy.strict:
                raise
            self.skip(node, str(exc))
            return None, {}
        self._choices[op] = choice
        return choice.backend, choice.rejected

    def skip(self, node: fx.Node, reason: str) -> None:
        self.report.skipped.append(Skip(self.pass_name, location(node), reason, self.graph_id))
        log.info("dsgraph: %s left %s alone: %s", self.pass_name, location(node), reason)

    def commit(self, gm: fx.GraphModule, *, op: str, old: fx.Node, new: fx.Node,
               inputs: Sequence[fx.Node], backend: Optional[str] = None,
               rejected: Optional[dict[str, str]] = None, detail: str = "") -> bool:
        """Replace ``old`` by ``new`` (already inserted, computed from ``inputs``). With verify on,
        both subgraphs run on random inputs first; a mismatch erases ``new`` and is reported."""
        record = Rewrite(self.pass_name, op, backend, location(old), dict(rejected or {}),
                         detail=detail, graph=self.graph_id)
        choice: Optional[Choice] = self._choices.pop(op, None)
        if choice is not None and choice.backend == backend:
            record.timings, record.tuning = dict(choice.timings), choice.tuning_note
        self.report.rewrites.append(record)
        if self.verify:
            mismatch = check_rewrite(gm, inputs, old, new)
            record.verified = mismatch is None
            if mismatch:
                record.rolled_back = True
                record.detail = f"{detail}. verify: {mismatch}" if detail else f"verify: {mismatch}"
                log.warning("dsgraph: %s rewrite at %s rolled back: %s", self.pass_name, record.location, mismatch)
                _erase_unused(gm.graph, new)
                return False
        old.replace_all_uses_with(new)
        self._inserted.append((record, new))
        log.info("dsgraph: %s rewrote %s -> dsgraph::%s [%s]", self.pass_name, record.location, op, backend or "-")
        return True


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op in ("placeholder", "output") or n.graph is not graph:
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)


def order_passes(passes: Iterable[Pass]) -> list[Pass]:
    """Topological order: a pass runs after every pass that provides something it needs. Ties keep
    the given order. A cycle raises :class:`PipelineError` naming it."""
    passes = list(passes)
    names = [p.name for p in passes]
    if len(set(names)) != len(names):
        raise PipelineError(f"pass names must be unique, got {names}")
    graph = nx.DiGraph()
    graph.add_nodes_from(names)
    for a in passes:
        for b in passes:
            if a is not b and set(a.provides) & set(b.needs):
                graph.add_edge(a.name, b.name)
    try:
        order = list(nx.lexicographical_topological_sort(graph, key=names.index))
    except nx.NetworkXUnfeasible:
        cycle = " -> ".join(u for u, _ in nx.find_cycle(graph))
        raise PipelineError(f"pass dependencies form a cycle: {cycle} -> {nx.find_cycle(graph)[0][0]}") from None
    by_name = {p.name: p for p in passes}
    return [by_name[n] for n in order]


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], policy: Policy, report: Report, *,
               verify: bool = False, graph_id: int = 0, requires_grad: frozenset = frozenset()) -> fx.GraphModule:
    ctx = PassContext(policy, report, verify, graph_id, requires_grad)
    for p in order_passes(x for x in passes if x.name not in policy.disabled_passes):
        ctx.pass_name = p.name
        p.run(gm, ctx)
        gm.graph.eliminate_dead_code()
        ctx.note_replaced(gm)
        gm.graph.lint()
    gm.recompile()
    return gm
