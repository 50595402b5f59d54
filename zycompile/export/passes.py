"""The recipe's graph passes on an exported program, so the package is the compiled model, not the raw step.

How: the pre-grad passes run on the program's unlifted module (``ep.module()``: ATen ops, weights as
``get_attr`` of the real tensors), then that module is exported again and AOTInductor compiles the
result; post-grad passes go in as Inductor's ``post_grad_custom_post_pass``, as in the live lowering.

Why this way, of the three ways to get the passes into AOTInductor:
- As Inductor config hooks: its post-grad hooks see a decomposed, functional graph (``mm``/``addmm`` of
  permuted weights, SDPA already lowered), so each pass would need a second implementation for that IR.
  ``pre_grad_custom_pass`` does run inside AOTInductor in torch 2.13 (on the same ATen graph; older
  releases skipped it), but a constant a pass adds there (fuse_projections' fused buffer) exists only
  in AOTInductor's private copy of the module: the package writer, which saves every constant once in
  ``weights.safetensors`` and hands them to the graphs at load, would never see it.
- Module rewrites before export cannot fuse three separate ``q_proj/k_proj/v_proj`` calls written in
  the model's code, nor swap its attention call, without patching each architecture.
- torch.export (non-strict) keeps ``aten.linear`` and ``aten.scaled_dot_product_attention`` whole, so
  the same passes match it (they take the torch-level and ATen spelling alike, ``passes/fx_util.py``),
  and the unlifted module holds the real weights that fuse_projections needs (its fused buffer is a view
  of the q/k/v storage, never a copy). Exporting that module again re-derives the program's signature
  (a new fused constant, the in-place cache writes) instead of editing an ExportedProgram by hand.

Fallbacks, each reported in the manifest and on the progress output: a pass that cannot live in a
package (``GraphPass.export_note``) is skipped; a pass that raises on the exported graph is dropped and
the others run again on a fresh copy; if the rewritten module does not export, the graph is compiled
without the passes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from zycompile.errors import RecipeError
from zycompile.lowering.inductor import PostGradHook
from zycompile.passes import PassContext, get_pass_class
from zycompile.pipeline import PassManager
from zycompile.report import CompileReport

log = logging.getLogger("zycompile")


@dataclasses.dataclass
class Applied:
    """One graph after the passes: the program to compile, its post-grad hook and what happened."""

    ep: torch.export.ExportedProgram
    post_hook: PostGradHook
    report: CompileReport
    fallbacks: list[str]

    def records(self, graph: str) -> list[dict[str, Any]]:
        return [
            {
                "graph": graph,
                "name": r.name,
                "stage": r.stage,
                "matches": r.matches,
                "time_ms": round(r.time_ms, 1),
                "notes": r.notes[:5],
            }
            for r in self.report.passes
        ]

    @property
    def warnings(self) -> list[str]:
        """The fallbacks, then the pass manager's own (a pass that matched nothing)."""
        return self.fallbacks + self.report.warnings

    def summary(self) -> str:
        done = ", ".join(f"{r.name} x{r.matches}" for r in self.report.passes) or "none"
        return f"passes {done}"


def exportable(recipe) -> tuple[Any, list[str]]:
    """``recipe`` without the passes that cannot live in a package, and why each was left out."""
    kept, notes = [], []
    for spec in recipe.passes:
        note = get_pass_class(spec.name).export_note
        if note:
            notes.append(f"pass '{spec.name}' not applied in export: {note}")
        else:
            kept.append(spec)
    return dataclasses.replace(recipe, passes=tuple(kept)), notes


def apply_passes(
    graph: str,
    ep: torch.export.ExportedProgram,
    args: tuple,
    dynamic_shapes: dict | None,
    recipe,
    index: int,
    state: dict,
    say: Callable[[str], None],
) -> Applied:
    """Run ``recipe``'s passes (see ``exportable``) on ``ep``, exported from ``args`` / ``dynamic_shapes``,
    and export the result again. ``index`` and ``state`` are the pass context's, as in ``ZyBackend``."""
    fallbacks: list[str] = []

    def fall_back(msg: str) -> None:
        fallbacks.append(msg)
        log.warning("export %s: %s", graph, msg)
        say(f"{graph}: {msg}")

    kept = list(recipe.passes)
    while True:
        run = dataclasses.replace(recipe, passes=tuple(kept))
        report = CompileReport(recipe.compute_hash())
        ctx = PassContext(run, list(args), index, state, exporting=True)
        pre = PassManager(run, "pre_grad", ctx, report)
        post = PostGradHook(PassManager(run, "post_grad", ctx, report))
        if not pre:
            return Applied(ep, post, report, fallbacks)
        gm = ep.module()  # a fresh unlifted copy of the graph each try; the weights are shared, not copied
        try:
            pre.run(gm)
        except RecipeError:
            raise  # debug.strict and a pass that matched nothing: the same error as the live compile
        except Exception as e:  # any failure of one pass: drop it, keep the others
            failed = pre.passes[len(report.passes)].name  # records are appended as each pass finishes
            fall_back(f"pass '{failed}' failed on the exported graph ({_short(e)}); skipped")
            kept = [s for s in kept if s.name != failed]
            continue
        try:
            with torch.no_grad():
                new = torch.export.export(gm, args, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:
            report.passes = [r for r in report.passes if r.stage != "pre_grad"]
            fall_back(
                f"the rewritten graph did not export ({_short(e)}); compiled without the pre-grad passes"
            )
            return Applied(ep, post, report, fallbacks)
        return Applied(new, post, report, fallbacks)


def _short(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"
