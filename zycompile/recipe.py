"""Recipes: one YAML file per model drives the whole pipeline.

YAML is read with ``yaml.safe_load`` into frozen dataclasses (``typed.build``); every bad input is one
``RecipeError`` naming the file, the key path, the bad value and what is allowed. ``--set a.b=v``
overrides are applied to the raw mapping before validation, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from zycompile import typed
from zycompile.errors import RecipeError

DTypeName = Literal["float32", "bfloat16", "float16"]
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "smollm2-135m"


class _Loader(yaml.SafeLoader):
    """``safe_load`` with YAML 1.2 booleans: only true/false are bools, so ``graphs: off`` stays 'off'."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != _BOOL_TAG]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    source: str = "smollm2-135m-instruct"
    dtype: DTypeName = "float32"


@dataclasses.dataclass(frozen=True)
class ParallelSection:
    # sp: weights replicated, KV cache sharded along the sequence over `degree` ranks (tree attention)
    mode: Literal["none", "sp", "tp", "tsp"] = "none"
    degree: int = 1
    kv_layout: Literal["round_robin", "contiguous"] = "round_robin"  # which rank owns position p
    timeout_s: float = 300.0  # a collective waiting longer than this ends the job with an error
    # tp only: shard the residual stream and norms on the sequence (all-gather/reduce-scatter pairs)
    sequence_parallel: bool = False

    def check(self):
        if self.sequence_parallel and self.mode != "tp":
            yield "sequence_parallel", f"got true with mode '{self.mode}'; it applies to mode 'tp' only"
        if self.degree < 1:
            yield "degree", f"got {self.degree!r}; expected an integer >= 1"
        if self.timeout_s <= 0:
            yield "timeout_s", f"got {self.timeout_s!r}; expected a number of seconds > 0"


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    options: Any  # the pass's own frozen Options dataclass


@dataclasses.dataclass(frozen=True)
class LoweringSection:
    backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    mode: Literal["default", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # Inductor config patches

    def check(self):
        import torch._inductor.config as inductor_config

        known = set(inductor_config._config.keys()) if hasattr(inductor_config, "_config") else set()
        for key in self.options:
            if known and key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                yield f"options.{key}", f"unknown key '{key}': not an option of torch._inductor.config{hint}"


@dataclasses.dataclass(frozen=True)
class RuntimeSection:
    max_seq_len: int = 2048
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8)
    prefill_buckets: tuple[int, ...] = (16, 64, 256)
    # buckets: pad each prompt chunk up to a bucket (one static graph per bucket);
    # dynamic: one graph with a symbolic length, no padding (largest bucket = chunk size).
    prefill: Literal["buckets", "dynamic"] = "buckets"
    graphs: Literal["auto", "on", "off"] = "auto"
    threads: int | None = None
    step_cache: bool = True  # save compiled steps to disk: a new process skips Dynamo (runtime/step_cache.py)
    # engine: reuse the cached K/V of shared prompt openings, up to this many MiB (0: off; runtime/prefix_cache.py)
    prefix_cache_mb: int = 256
    # engine on a CPU: run a new request's prefill on half the threads while the other half decodes the
    # running requests (runtime/prefill_worker.py). Off by default: on the 2-core EPYC it moved c=8 +2%
    # (1-thread decode is 1.5-1.7x slower than 2-thread); bench/prefill_overlap.py says if it pays
    prefill_overlap: bool = False
    # engine: while requests decode, a waiting prompt runs in chunks of this many tokens inside the decode
    # step (one forward over batch + chunk rows, runtime/mixed_step.py) instead of as its own forward;
    # 0: off. Where a recipe cannot (speculative decoding, a sharded KV cache) the engine says so and
    # prefills chunks alone.
    mixed_prefill_tokens: int = 0

    def check(self):
        if self.max_seq_len < 2:
            yield "max_seq_len", f"got {self.max_seq_len!r}; expected an integer >= 2"
        for key in ("batch_buckets", "prefill_buckets"):
            vals = getattr(self, key)
            if not vals:
                yield key, "got an empty list; expected at least one bucket"
            elif any(v < 1 for v in vals) or list(vals) != sorted(set(vals)):
                yield key, f"got {list(vals)!r}; expected positive integers in strictly increasing order"
        if self.prefill_buckets and self.prefill_buckets[-1] > self.max_seq_len:
            yield (
                "prefill_buckets",
                (
                    f"got {list(self.prefill_buckets)!r}; every bucket must be <= runtime.max_seq_len "
                    f"({self.max_seq_len})"
                ),
            )
        if self.mixed_prefill_tokens < 0:
            yield (
                "mixed_prefill_tokens",
                f"got {self.mixed_prefill_tokens!r}; expected an integer >= 0 (0 turns mixed steps off)",
            )
        if self.threads is not None and self.threads < 1:
            yield "threads", f"got {self.threads!r}; expected an integer >= 1 or null"
        if self.prefix_cache_mb < 0:
            yield (
                "prefix_cache_mb",
                f"got {self.prefix_cache_mb!r}; expected an integer >= 0 (0 turns it off)",
            )


# Recipe keys that no compiled graph depends on (see ``Recipe.graph_hash``).
# The speculative knobs below pick draft lengths at run time; each graph's shapes are in its own key.
# debug.dump_dir stays in: a cache hit would skip the passes and write no dumps.
GRAPH_NEUTRAL_KEYS = (
    "runtime.prefix_cache_mb",
    "runtime.prefill_overlap",
    "runtime.step_cache",
    "speculative.num_tokens",
    "speculative.adaptive",
    "speculative.min_tokens",
    "speculative.ngram_max",
    "speculative.ngram_min",
    "speculative.draft_confidence",
    "speculative.cost_aware",
    "speculative.lookup_tokens",
    "speculative.tree",
    "speculative.tree_max_batch",
    "speculative.tree_sampling",
)


MAX_TREE_NODES = 15  # a tree block (nodes + the pending token) within the CPU attention kernel's 16 queries


@dataclasses.dataclass(frozen=True)
class SpeculativeSection:
    """Speculative decoding (runtime/speculative.py): draft ``num_tokens`` tokens, verify them in one
    target forward. Keys of other methods are ignored, so ``--set speculative.method=...`` just works."""

    method: Literal["none", "ngram", "draft_model", "early_exit", "eagle"] = "none"
    num_tokens: int = 4  # k drafted tokens per verify forward (the most, when adaptive)
    adaptive: bool = False  # k += 1 after a round where every draft was accepted, k -= 1 otherwise
    min_tokens: int = 1  # the least k when adaptive
    ngram_max: int = 3  # ngram: longest suffix looked up in the prompt + output so far
    ngram_min: int = 1
    draft_model: str | None = None  # draft_model: a model source with the target's tokenizer
    exit_layer: int | None = None  # early_exit: target layers the draft runs before norm + head
    eagle_head: str | None = None  # eagle: .safetensors from `zycompile train-draft` (relative: recipe dir)
    # eagle: stop drafting (k' < k) once the product of the drafts' probabilities falls below this
    draft_confidence: float = 0.0
    # eagle: where the context's last ngram_max..ngram_min tokens occurred before (prompt lookup),
    # draft up to this many of the tokens that followed instead of the head's (0: head only)
    lookup_tokens: int = 0
    # eagle: verify a draft tree, not a chain (sampled rows: see tree_sampling): [w_1, w_2, ...] =
    # the head's w_1 most likely first tokens, its w_2 most likely second tokens under the best first
    # one, ... (empty: a chain)
    tree: tuple[int, ...] = ()
    # eagle: trees only in batches of at most this many rows; larger batches verify chains (batch x
    # width rows outgrow the small-GEMM kernel: at c=4 a tree [2] ran 54 tok/s against a chain's 67-75)
    tree_max_batch: int = 1
    # eagle: rounds with a sampled row verify the tree too (tree rejection sampling), not a chain. Off by
    # default: at temperature 0.7 on the EPYC it gave 1.53 tokens per forward against the chain's 1.46
    # but 1.20x plain against 1.23x (RESULTS.md 2026-11-29 08:02)
    tree_sampling: bool = False
    # verify the prefix of the drafts that maximises expected tokens per measured second (draft_length.py)
    cost_aware: bool = False
    # eagle: the precision of the copy of its weights the head's linears stream (CPU, fp32 models; math
    # stays fp32). float16 halves the bytes of a head call; the head's own weights are fp16 on disk.
    head_weights: Literal["float16", "float32"] = "float16"

    @property
    def max_drafts(self) -> int:
        """The most drafts one verify can hold: the head's k, a longer prompt-lookup run (eagle), or a
        draft tree's nodes (a lookup run sits beside the head's best first token in a tree)."""
        if self.method != "eagle":
            return self.num_tokens
        return max(self.num_tokens, sum(self.tree), self.lookup_tokens + (1 if self.tree else 0))

    def check(self):
        if self.num_tokens < 1:
            yield "num_tokens", f"got {self.num_tokens!r}; expected an integer >= 1"
        if not 1 <= self.min_tokens <= max(self.num_tokens, 1):
            yield "min_tokens", f"got {self.min_tokens!r}; expected an integer in [1, num_tokens]"
        if not 1 <= self.ngram_min <= self.ngram_max:
            yield (
                "ngram_min",
                f"got {self.ngram_min!r}; expected 1 <= ngram_min <= ngram_max ({self.ngram_max})",
            )
        need = {"draft_model": "draft_model", "early_exit": "exit_layer", "eagle": "eagle_head"}.get(
            self.method
        )
        if need and getattr(self, need) is None:
            yield need, f"missing; method '{self.method}' needs speculative.{need}"
        if not 0.0 <= self.draft_confidence < 1.0:
            yield "draft_confidence", f"got {self.draft_confidence!r}; expected a number in [0, 1)"
        if self.lookup_tokens < 0:
            yield "lookup_tokens", f"got {self.lookup_tokens!r}; expected an integer >= 0 (0 turns it off)"
        if any(w < 1 for w in self.tree) or sum(self.tree) > MAX_TREE_NODES:
            yield (
                "tree",
                f"got {list(self.tree)!r}; expected candidates per depth, each >= 1, at most "
                f"{MAX_TREE_NODES} nodes in all (e.g. [2, 1])",
            )
        if self.tree_max_batch < 1:
            yield "tree_max_batch", f"got {self.tree_max_batch!r}; expected an integer >= 1"
        if self.exit_layer is not None and self.exit_layer < 1:
            yield "exit_layer", f"got {self.exit_layer!r}; expected an integer >= 1"


@dataclasses.dataclass(frozen=True)
class DebugSection:
    dump_dir: str | None = None
    strict: bool = False  # a pass that matches nothing where it should is an error, not a warning


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    parallel: ParallelSection = dataclasses.field(default_factory=ParallelSection)
    passes: tuple[PassSpec, ...] = ()
    lowering: LoweringSection = dataclasses.field(default_factory=LoweringSection)
    runtime: RuntimeSection = dataclasses.field(default_factory=RuntimeSection)
    speculative: SpeculativeSection = dataclasses.field(default_factory=SpeculativeSection)
    debug: DebugSection = dataclasses.field(default_factory=DebugSection)
    source_file: str | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict:
        d = typed.to_plain(self)
        d.pop("source_file")
        d["passes"] = [{"name": p["name"], **p["options"]} for p in d["passes"]]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def compute_hash(self, ignore: tuple[str, ...] = ()) -> str:
        """Stable across processes and key order: sha256 of the canonical JSON of the resolved recipe,
        less the ``ignore``d keys (dotted paths, e.g. ``runtime.prefix_cache_mb``)."""
        d = self.to_dict()
        for path in ignore:
            section, _, key = path.rpartition(".")
            (d[section] if section else d).pop(key, None)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def graph_hash(self) -> str:
        """The hash of what compiled graphs depend on: the keys that change no traced code are left out,
        so a new prefix-cache size does not recompile (or re-save) every graph."""
        return self.compute_hash(ignore=GRAPH_NEUTRAL_KEYS)

    def pass_spec(self, name: str) -> PassSpec | None:
        return next((p for p in self.passes if p.name == name), None)

    def validate(self) -> Recipe:
        """Cross-field rules; each failure is a RecipeError naming the key path."""
        from zycompile.passes import get_pass_class

        where = self.source_file or "<recipe>"
        if self.parallel.mode == "none" and self.parallel.degree != 1:
            typed.fail(
                where, "parallel.degree", f"got {self.parallel.degree}; parallel.mode 'none' needs degree 1"
            )
        if self.parallel.mode != "none" and self.parallel.degree < 2:
            typed.fail(
                where,
                "parallel.degree",
                f"got {self.parallel.degree}; mode '{self.parallel.mode}' needs >= 2",
            )
        tree = self.pass_spec("tree_attention")
        sharded_kv = self.parallel.mode in ("sp", "tsp")
        if self.parallel.mode == "sp" and (tree is None or tree.options.group != "sequence"):
            typed.fail(
                where,
                "parallel.mode",
                "'sp' shards the KV cache along the sequence; it needs the pass "
                "{name: tree_attention, group: sequence} after canonicalize_attention",
            )
        seen: set[str] = set()
        for i, p in enumerate(self.passes):
            if p.name == "tree_attention" and p.options.group == "sequence" and not sharded_kv:
                typed.fail(
                    where,
                    f"passes[{i}].group",
                    f"'sequence' needs parallel.mode 'sp' or 'tsp' (got '{self.parallel.mode}'); "
                    "use group: none for single-device split-KV",
                )
            if p.name in seen:
                typed.fail(
                    where, f"passes[{i}].name", f"pass '{p.name}' is listed twice; list each pass once"
                )
            seen.add(p.name)
            if get_pass_class(p.name).stage == "post_grad" and self.lowering.backend == "eager":
                typed.fail(
                    where,
                    f"passes[{i}].name",
                    f"'{p.name}' is a post-grad pass and needs lowering.backend 'aot_eager' or 'inductor' "
                    "(got 'eager')",
                )
        return self


def _parse_passes(raw: Any, where: str) -> tuple[PassSpec, ...]:
    from zycompile.passes import PASS_REGISTRY

    if raw is None:
        return ()
    if not isinstance(raw, list):
        typed.fail(
            where, "passes", f"got {typed.describe(raw)}; expected a list of {{name: ..., options...}}"
        )
    specs = []
    for i, item in enumerate(raw):
        path = f"passes[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping):
            typed.fail(where, path, f"got {typed.describe(item)}; expected a mapping with a 'name' key")
        if "name" not in item:
            typed.fail(where, f"{path}.name", f"missing required key in {typed.describe(dict(item))}")
        name = item["name"]
        if not isinstance(name, str) or name not in PASS_REGISTRY:
            typed.fail(
                where, f"{path}.name", f"unknown pass {name!r} (allowed: {', '.join(sorted(PASS_REGISTRY))})"
            )
        options_cls = PASS_REGISTRY[name].Options
        opts = typed.build(options_cls, {k: v for k, v in item.items() if k != "name"}, where, path)
        specs.append(PassSpec(name=name, options=opts))
    return tuple(specs)


def from_dict(data: Any, source_file: str | None = None) -> Recipe:
    where = source_file or "<recipe>"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        typed.fail(where, "", f"got {typed.describe(data)}; a recipe is a mapping of sections")
    data = dict(data)
    allowed = [f.name for f in dataclasses.fields(Recipe) if f.init and f.name != "source_file"]
    for key in data:
        if key not in allowed:
            typed.fail(where, str(key), typed.unknown_key_message(str(key), allowed))
    passes = _parse_passes(data.pop("passes", None), where)
    sections = typed.build(_Sections, data, where)
    return Recipe(passes=passes, source_file=source_file, **vars(sections)).validate()


@dataclasses.dataclass(frozen=True)
class _Sections:
    """The non-pass sections; ``passes`` is parsed separately because its options depend on the name."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    parallel: ParallelSection = dataclasses.field(default_factory=ParallelSection)
    lowering: LoweringSection = dataclasses.field(default_factory=LoweringSection)
    runtime: RuntimeSection = dataclasses.field(default_factory=RuntimeSection)
    speculative: SpeculativeSection = dataclasses.field(default_factory=SpeculativeSection)
    debug: DebugSection = dataclasses.field(default_factory=DebugSection)


def resolve_path(name_or_path: str | os.PathLike) -> Path:
    """A path, or the name of a shipped recipe (``smollm2-135m`` → recipes/smollm2-135m.yaml)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
    raise RecipeError(f"{name_or_path}: recipe file not found (shipped recipes: {', '.join(names)})")


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe file ({e.strerror})") from None
    try:
        return _safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{path}: malformed YAML{loc}: {problem}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected KEY.PATH=VALUE (e.g. runtime.max_seq_len=1024)")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise RecipeError(f"override {item!r}: empty key path")
    try:
        value = _safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: Any, overrides: Iterable[str] | Mapping[str, Any] | None) -> dict:
    """Apply ``a.b.c=value`` overrides to a raw recipe mapping; ``passes.<name|index>.opt`` reaches pass options."""
    data = json.loads(json.dumps(data or {}))  # deep copy of plain YAML data
    if not overrides:
        return data
    items = (
        [(k.split("."), v) for k, v in overrides.items()]
        if isinstance(overrides, Mapping)
        else [parse_override(o) for o in overrides]
    )
    for parts, value in items:
        label = ".".join(parts)
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = _pick_pass(node, part, label)
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"override {label}: '{'.'.join(parts[:depth])}' is not a mapping")
            node = node.setdefault(part, [] if part == "passes" and depth == 0 else {})
        last = parts[-1]
        if isinstance(node, list):
            raise RecipeError(
                f"override {label}: set a pass option (passes.<name>.<option>), not a whole pass"
            )
        if not isinstance(node, dict):
            raise RecipeError(f"override {label}: '{'.'.join(parts[:-1])}' is not a mapping")
        node[last] = value
    return data


def _pick_pass(passes: list, key: str, label: str) -> dict:
    if key.isdigit():
        if int(key) >= len(passes):
            raise RecipeError(f"override {label}: no pass at index {key} (the recipe has {len(passes)})")
        item = passes[int(key)]
    else:
        named = [p for p in passes if (p.get("name") if isinstance(p, dict) else p) == key]
        if not named:
            have = [p.get("name") if isinstance(p, dict) else p for p in passes]
            raise RecipeError(f"override {label}: pass '{key}' is not in the recipe (passes: {have})")
        item = named[0]
    if isinstance(item, str):
        idx = passes.index(item)
        passes[idx] = item = {"name": item}
    return item


def load_recipe(
    recipe: str | os.PathLike | Mapping | Recipe | None = None,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
) -> Recipe:
    """A Recipe from a path, a shipped recipe name, a mapping or a Recipe, with overrides applied."""
    if recipe is None:
        recipe = DEFAULT_RECIPE
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        return from_dict(apply_overrides(recipe.to_dict(), overrides), recipe.source_file)
    if isinstance(recipe, Mapping):
        return from_dict(apply_overrides(recipe, overrides))
    path = resolve_path(recipe)
    return from_dict(apply_overrides(read_yaml(path), overrides), str(path))
