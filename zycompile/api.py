"""optimize(): module transforms → torch.compile(backend=ZyBackend(recipe)) → OptimizedModel."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from zycompile.backend import ZyBackend
from zycompile.parallel.distributed import launched_world_size, setup
from zycompile.passes import get_pass_class
from zycompile.recipe import Recipe, load_recipe
from zycompile.report import CompileReport


class OptimizedModel:
    """The model compiled by a recipe. Call it like the model; ``generate`` runs the static-cache runtime."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe, tokenizer: Any = None):
        self.model = model
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.backend = ZyBackend(recipe)
        self.compiled = torch.compile(model, backend=self.backend, dynamic=False)
        self._generator = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(*args, **kwargs)

    def compile_report(self) -> CompileReport:
        return self.backend.report

    @property
    def config(self):
        return self.model.config

    def generator(self):
        """The static-cache runtime bound to this model (built on first use)."""
        if self._generator is None:
            from zycompile.runtime.generate import Generator

            if self.recipe.parallel.mode == "tsp":  # tokens split over the ranks in prefill
                from zycompile.parallel.tsp import tsp_generator

                self._generator = tsp_generator(self)
            else:
                self._generator = Generator(self)
        return self._generator

    def generate(self, prompts: Any, **kwargs: Any):
        """Generate from strings or token ids; see ``zycompile.runtime.generate.Generator.generate``."""
        return self.generator().generate(prompts, **kwargs)

    def export(self, out_dir: str | os.PathLike, progress=None):
        """Write an AOTInductor package (graphs + safetensors weights + manifest) that ``zycompile.load``
        runs without this model's Python code. Returns the manifest path."""
        from zycompile.export import write_package

        return write_package(self, out_dir, progress)


def optimize(
    model: torch.nn.Module | str | None = None,
    recipe: str | os.PathLike | Mapping | Recipe | None = None,
    *,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    tokenizer: Any = None,
) -> OptimizedModel:
    """Compile ``model`` (a module, a model source name, or None for the recipe's ``model.source``)."""
    recipe = load_recipe(recipe, overrides)
    if model is None or isinstance(model, str):
        from zycompile.models import load_model

        loaded = load_model(model or recipe.model.source, recipe.model.dtype)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    notes: list[str] = []
    if recipe.parallel.mode == "tsp" and recipe.speculative.method != "none":
        from zycompile.errors import ZyError

        raise ZyError(
            f"{recipe.source_file or '<recipe>'}: parallel.mode 'tsp' does not run speculative decoding; "
            "set speculative.method: none"
        )
    if recipe.parallel.mode == "tsp":  # refuse an unsplittable model before any process group exists
        from zycompile.parallel.tsp import check_tsp

        check_tsp(model.config, recipe.parallel.degree)
    if recipe.parallel.mode != "none" or launched_world_size() > 1:
        device = next(model.parameters()).device
        setup(recipe.parallel, device)
        if recipe.parallel.mode == "tp":
            from zycompile.parallel.tp import apply_tp

            recipe, notes = _without_unsharded_passes(recipe)
            par = recipe.parallel
            fuse = any(spec.name == "fuse_projections" for spec in recipe.passes)  # fused per shard
            apply_tp(model, par.degree, device.type, par.sequence_parallel, local_columns=fuse)
        elif recipe.parallel.mode == "tsp":
            from zycompile.parallel.tsp import apply_tsp, tsp_passes

            recipe, notes, tree = tsp_passes(recipe)
            model = apply_tsp(model, recipe.parallel.degree, tree)
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
    _allow_bucket_recompiles(recipe)
    model.eval()
    model.requires_grad_(False)  # a serving compile: weights are constants, autograd never records
    for spec in recipe.passes:
        get_pass_class(spec.name).prepare(model, spec.options)
    opt = OptimizedModel(model, recipe, tokenizer)
    opt.compile_report().warnings.extend(notes)
    return opt


def _without_unsharded_passes(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """Drop passes that re-lay weights in place: under TP the weights are DTensor shards. Kept:
    ``fuse_projections``, which fuses this rank's column shards (``apply_tp(local_columns=True)``)."""
    import dataclasses
    import logging

    kept, notes = [], []
    for spec in recipe.passes:
        if get_pass_class(spec.name).relays_weights and spec.name != "fuse_projections":
            notes.append(
                f"pass '{spec.name}' skipped under parallel.mode 'tp' (it re-lays unsharded weights)"
            )
            logging.getLogger("zycompile").warning(notes[-1])
        else:
            kept.append(spec)
    return dataclasses.replace(recipe, passes=tuple(kept)), notes


def _allow_bucket_recompiles(recipe: Recipe) -> None:
    """One graph per prefill bucket and per batch bucket is by design; don't let Dynamo give up early."""
    prefill_kinds = 2 if recipe.parallel.mode == "tsp" else 1  # TSP: first chunk / later chunks
    need = (
        len(recipe.runtime.prefill_buckets) * len(recipe.runtime.batch_buckets) * prefill_kinds
        + len(recipe.runtime.batch_buckets)
        + 8
    )
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < need:
        setattr(cfg, name, need)
