"""ZyBackend: the torch.compile backend. Pre-grad passes on the Dynamo graph, then the recipe's lowering.

``torch.compile(model, backend="zycompile", options={"recipe": "llama-tiny"})`` reaches
``zycompile_backend`` through the ``torch_dynamo_backends`` entry point; ``zycompile.optimize`` builds a
``ZyBackend`` directly so it can keep the compile report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch.fx

from zycompile.lowering.graphs import device_of, graph_patches
from zycompile.lowering.inductor import lower
from zycompile.passes import PassContext
from zycompile.pipeline import PassManager
from zycompile.recipe import Recipe, load_recipe
from zycompile.report import CompileReport, GraphRecord

log = logging.getLogger("zycompile")


class ZyBackend:
    def __init__(self, recipe: Recipe, report: CompileReport | None = None):
        self.recipe = recipe
        self.report = report or CompileReport(recipe.compute_hash())
        self.state: dict[str, Any] = {}  # shared by all graphs of one model (e.g. fused buffers)
        self.saving = False  # set by the step cache while it captures a graph to save (runtime/step_cache.py)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        t0 = time.perf_counter()
        record = GraphRecord(len(self.report.graphs), len(gm.graph.nodes), self.recipe.lowering.backend)
        self.report.graphs.append(record)
        ctx = PassContext(self.recipe, list(example_inputs), record.index, self.state)
        PassManager(self.recipe, "pre_grad", ctx, self.report).run(gm)
        post = PassManager(self.recipe, "post_grad", ctx, self.report)
        graph_options, note = graph_patches(
            self.recipe.runtime.graphs, self.recipe.lowering.backend, device_of(example_inputs)
        )
        if note and note not in self.report.warnings:
            self.report.warnings.append(note)
            log.warning(note)
        compiled = lower(gm, example_inputs, self.recipe.lowering, post, graph_options)
        if self.saving:
            from zycompile.lowering.artifact import SavedGraph

            compiled = SavedGraph.wrap(compiled, gm, example_inputs) or compiled
        record.compile_s = time.perf_counter() - t0
        log.info("zycompile: graph %d lowered in %.1fs", record.index, record.compile_s)
        return compiled


def zycompile_backend(
    gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None
) -> Callable:
    """Entry-point backend. ``options``: ``recipe`` (path, shipped name, mapping or Recipe), ``overrides``."""
    options = dict(options or {})
    recipe = load_recipe(options.pop("recipe", None), options.pop("overrides", None))
    if options:
        from zycompile.errors import RecipeError

        raise RecipeError(
            f"torch.compile options: unknown key(s) {sorted(options)} (allowed: recipe, overrides)"
        )
    return ZyBackend(recipe)(gm, example_inputs)
