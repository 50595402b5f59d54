"""What a compile did: per graph and per pass, time and match counts; graph breaks; warnings."""

from __future__ import annotations

import dataclasses
from collections import Counter


@dataclasses.dataclass
class PassRecord:
    graph: int
    name: str
    stage: str
    matches: int
    time_ms: float
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GraphRecord:
    index: int
    nodes: int
    lowering: str
    compile_s: float = 0.0


class CompileReport:
    """Filled by the backend as Dynamo hands it graphs; read with ``optimized.compile_report()``."""

    def __init__(self, recipe_hash: str):
        from torch._dynamo.utils import counters

        self.recipe_hash = recipe_hash
        self.graphs: list[GraphRecord] = []
        self.passes: list[PassRecord] = []
        self.warnings: list[str] = []
        self._counters = counters
        self._breaks_at_start = Counter(counters["graph_break"])

    @property
    def graph_breaks(self) -> Counter:
        """Graph-break reasons seen since this report was created (Dynamo's counters)."""
        now = Counter(self._counters["graph_break"])
        now.subtract(self._breaks_at_start)
        return +now

    def matches(self, name: str, stage: str | None = None) -> int:
        return sum(r.matches for r in self.passes if r.name == name and (stage is None or r.stage == stage))

    def to_dict(self) -> dict:
        return {
            "recipe_hash": self.recipe_hash,
            "graphs": [dataclasses.asdict(g) for g in self.graphs],
            "graph_breaks": dict(self.graph_breaks),
            "passes": [dataclasses.asdict(p) for p in self.passes],
            "warnings": list(self.warnings),
        }

    def summary(self) -> str:
        lines = [
            f"recipe {self.recipe_hash}: {len(self.graphs)} graph(s), {sum(self.graph_breaks.values())} break(s)"
        ]
        for reason, n in self.graph_breaks.items():
            lines.append(f"  break x{n}: {reason}")
        for g in self.graphs:
            lines.append(f"  graph {g.index}: {g.nodes} nodes, lowered by {g.lowering} in {g.compile_s:.2f}s")
        for r in self.passes:
            lines.append(f"    {r.stage:9s} {r.name:24s} matches={r.matches:<4d} {r.time_ms:8.1f} ms")
            lines.extend(f"      note: {n}" for n in r.notes[:5])
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()
