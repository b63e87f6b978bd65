"""What was rewritten, where, by which backend, and why the others were not chosen."""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class Rewrite:
    pass_name: str
    op: str
    backend: Optional[str]
    location: str
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    # None: not checked (verify=False); True: matched the eager subgraph; False: mismatch, rolled back.
    verified: Optional[bool] = None
    detail: str = ""
    graph: int = 0
    rolled_back: bool = False
    # Autotune: each candidate's time in ms (or why it has none), and how the choice was made
    # ("measured", "cached", or why nothing was measured).
    timings: dict[str, "float | str"] = dataclasses.field(default_factory=dict)
    tuning: str = ""
    # The later pass that rewrote this rewrite's op in turn (its op is not in the compiled graph).
    replaced_by: str = ""


@dataclasses.dataclass
class Skip:
    """A site a pass recognised but left alone, and why (shown so users can fix their model)."""

    pass_name: str
    location: str
    reason: str
    graph: int = 0


class Report:
    """``report.rewrites``: list of :class:`Rewrite`; ``report.skipped``: sites left alone;
    ``report.counts``: applied rewrites per pass (those a later pass rewrote in turn included: their
    ``replaced_by`` names it); ``str(report)``: a readable table."""

    def __init__(self):
        self.rewrites: list[Rewrite] = []
        self.skipped: list[Skip] = []
        self.graphs = 0
        self.policy_name = ""
        self.residual = ""
        # graph id -> the modules of the optimized model that graph ran for (the narrowest module holding
        # the parameters it read), in first-call order. Dynamo reuses one compiled graph for identical
        # layers (their parameters are graph inputs), so one graph's rewrites can serve several layers.
        self.served: dict[int, list[str]] = {}

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rewrites:
            if not r.rolled_back:
                counts[r.pass_name] = counts.get(r.pass_name, 0) + 1
        return counts

    def count(self, pass_name: str) -> int:
        return self.counts.get(pass_name, 0)

    def sites(self, op: str) -> list[tuple[str, Rewrite]]:
        """Each applied rewrite of dsgraph::``op`` once per module its graph served (``""`` when
        unknown): ``[(module path, rewrite), ...]``."""
        return [(module, r) for r in self.rewrites if r.op == op and not r.rolled_back and not r.replaced_by
                for module in self.served.get(r.graph) or [""]]

    def __str__(self) -> str:
        head = (f"dsgraph report: {len(self.rewrites)} rewrite(s) in {self.graphs} graph(s), "
                f"policy {self.policy_name or '?'}, residual graph -> {self.residual or '?'}")
        if not self.graphs:
            head += "\n(nothing compiled yet: call the optimized model once)"
        rows = [("graph", "pass", "op", "backend", "verified", "location", "why not the others")]
        for r in self.rewrites:
            verified = {None: "-", True: "yes", False: "MISMATCH, rolled back"}[r.verified]
            why = "; ".join(f"{b}: {reason}" for b, reason in r.rejected.items())
            if r.timings or r.tuning:
                timed = ", ".join(f"{b} {t:.3g} ms" if isinstance(t, float) else f"{b} {t}"
                                  for b, t in r.timings.items())
                tuning = r.tuning if r.tuning.startswith("autotune") else f"autotune ({r.tuning})"
                why = "; ".join(x for x in (f"{tuning}: {timed}" if timed else tuning, why) if x)
            if r.detail:
                why = f"{r.detail}. {why}" if why else r.detail
            if r.replaced_by:
                why = f"replaced by the {r.replaced_by} pass (not in the compiled graph). {why}".rstrip(". ")
            rows.append((str(r.graph), r.pass_name, r.op, r.backend or "-", verified, r.location, why))
        lines = [head, _table(rows)] if len(rows) > 1 else [head]
        lines += [f"graph {g} ran for {len(ms)} modules: {', '.join(ms)}"
                  for g, ms in self.served.items() if len(ms) > 1]
        if self.skipped:
            lines.append("sites left alone:")
            lines += [f"  [graph {s.graph}] {s.pass_name} at {s.location}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)

    __repr__ = __str__


def _table(rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    widths[-1] = 0  # the last column is free text
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(rows[0]), fmt(tuple("-" * max(w, 3) for w in widths))] + [fmt(r) for r in rows[1:]])
