"""PassManager: runs the recipe's passes of one stage in recipe order, timed, counted and dumped."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch.fx

from zycompile.errors import RecipeError
from zycompile.passes import GraphPass, PassContext, get_pass_class
from zycompile.report import CompileReport, PassRecord

log = logging.getLogger("zycompile")


class PassManager:
    def __init__(self, recipe, stage: str, ctx: PassContext, report: CompileReport):
        self.recipe = recipe
        self.stage = stage
        self.ctx = ctx
        self.report = report
        self.passes: list[GraphPass] = []
        for spec in recipe.passes:
            cls = get_pass_class(spec.name)
            if cls.stage == stage:
                self.passes.append(cls(spec.options, ctx))

    def __bool__(self) -> bool:
        return bool(self.passes)

    def uuid(self) -> str:
        """Covers the recipe and every pass's source + options, so Inductor's cache is never stale."""
        blob = self.recipe.graph_hash() + self.stage + "".join(p.uuid() for p in self.passes)
        return hashlib.sha256(blob.encode()).hexdigest()

    def run(self, gm: torch.fx.GraphModule) -> None:
        dump_dir = self.recipe.debug.dump_dir
        for i, p in enumerate(self.passes):
            tag = f"graph{self.ctx.graph_index}_{self.stage}_{i:02d}_{p.name}"
            if dump_dir:
                _dump(Path(dump_dir) / f"{tag}_before.txt", gm)
            t0 = time.perf_counter()
            result = p(gm)
            dt = (time.perf_counter() - t0) * 1e3
            if dump_dir:
                _dump(Path(dump_dir) / f"{tag}_after.txt", gm)
            self.report.passes.append(
                PassRecord(self.ctx.graph_index, p.name, self.stage, result.matches, dt, result.notes)
            )
            if result.matches == 0 and p.expect_matches:
                self._no_match(p, gm, result.notes)

    def _no_match(self, p: GraphPass, gm: torch.fx.GraphModule, notes: list[str]) -> None:
        why = f" ({'; '.join(notes[:3])})" if notes else ""
        msg = (
            f"pass '{p.name}' matched nothing in graph {self.ctx.graph_index} "
            f"({len(gm.graph.nodes)} nodes){why}; the graph is lowered unchanged by it"
        )
        if self.recipe.debug.strict:
            raise RecipeError(f"{msg} [debug.strict is true]")
        self.report.warnings.append(msg)
        log.warning(msg)


def _dump(path: Path, gm: torch.fx.GraphModule) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(gm.print_readable(print_output=False))
