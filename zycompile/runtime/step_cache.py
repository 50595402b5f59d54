"""Compiled steps kept on disk, so a new process skips Dynamo's trace (the warm start).

On a warm start the Inductor and AOTAutograd caches hit, and what is left is Dynamo re-tracing the HF
model's Python: ~12 of ~15 s for SmolLM2's prefill and decode graphs on the 2-core CPU. Here each
step graph is captured with ``torch.compile(...).aot_compile`` (Dynamo's bytecode for the step, the
graph our backend lowered as a ``SavedGraph``, and the guards on the step's arguments) and pickled
under ``$ZYCOMPILE_STEP_CACHE`` (default ``$ZYCOMPILE_CACHE/steps``, ``~/.cache/zycompile/steps``).
A later process with the same model geometry, recipe, zycompile source and torch build loads it
instead of tracing.

Guards: only those on the step's tensor arguments (shapes, dtypes, strides), the symbolic shape
ranges and global state (grad mode) are kept; the model is frozen after ``optimize``, as in ``compile_step``. The directory
key covers the rest. A step that cannot be captured (a graph break, an unsavable graph) is traced by
``compile_step`` instead, with a warning; the other steps stay saved. Used for CPU Inductor lowering with no
parallelism (``runtime.step_cache``); elsewhere the runtime traces as before.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import zycompile
from zycompile.runtime.compiled import compile_step

log = logging.getLogger("zycompile")


def step_cache_root() -> Path:
    env = os.environ.get("ZYCOMPILE_STEP_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("ZYCOMPILE_CACHE") or "~/.cache/zycompile").expanduser() / "steps"


@functools.cache
def _source_digest() -> str:  # once per process: the package's files do not change under it
    h = hashlib.sha256()
    root = Path(zycompile.__file__).parent
    for p in sorted(root.rglob("*")):
        if p.suffix in (".py", ".yaml") and p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _tuning_digest() -> str:
    """The tuning databases ``db: auto`` may read (their winners are baked into saved plans)."""
    from zycompile.tuning.db import cache_dir

    h = hashlib.sha256()
    folder = cache_dir()
    for p in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def model_key(owner: Any, fn_name: str) -> str:
    """Everything a saved step depends on besides its arguments."""
    model, recipe = owner.model, owner.recipe
    params = [
        (n, tuple(t.shape), str(t.dtype), t.stride(), t.storage_offset(), str(t.device))
        for n, t in [*model.named_parameters(), *model.named_buffers()]
    ]
    blob = json.dumps(
        {
            "fn": f"{type(owner).__qualname__}.{fn_name}",
            "torch": torch.__version__,
            "zycompile": _source_digest(),
            "tuning": _tuning_digest(),
            "recipe": recipe.graph_hash(),
            "config": model.config.to_json_string(use_diff=False),
            "params": params,
            # what else the step reads that the target's parameters do not cover (a draft head's
            # weights). Its own name: Generator.step_key is a method, whose repr (an address) made
            # every process's key new, so no saved target step was ever loaded again.
            "extra": getattr(owner, "step_cache_extra", ""),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _signature(args: tuple) -> tuple:
    """The argument structure a saved step was captured for: dtype and size per tensor, -1 where a
    dimension is marked dynamic (one symbolic graph for all its sizes), and the intra-op thread count
    (Dynamo guards on it and Inductor's CPU kernels bake it in: the engine's prefill worker runs steps
    at half the threads). Built on every call: a plain tuple, hashed into a file name only when saving
    or loading (``_stem``)."""
    sig: list[Any] = [("threads", torch.get_num_threads())]
    for a in args:
        if isinstance(a, torch.Tensor):
            d = a.__dict__  # empty for an unmarked tensor: the common case costs nothing more
            dyn = (
                set(d.get("_dynamo_weak_dynamic_indices", ())) | set(d.get("_dynamo_dynamic_indices", ()))
                if d
                else ()
            )
            sig.append((a.dtype, tuple(-1 if i in dyn else n for i, n in enumerate(a.shape)), a.device.type))
        else:
            sig.append(a)
    return tuple(sig)


def _describe(sig: tuple) -> str:
    """The argument shapes of a signature, for messages: ``[1, -1] x [1, -1] x ...`` (-1: dynamic)."""
    return (
        "("
        + ", ".join(str(list(a[1])) if isinstance(a, tuple) and len(a) == 3 else repr(a) for a in sig[1:])
        + ")"
    )


def _stem(sig: tuple) -> str:
    return hashlib.sha256(repr(sig).encode()).hexdigest()[:16]


_MARKS = (
    "_dynamo_dynamic_indices",
    "_dynamo_weak_dynamic_indices",
    "_dynamo_unbacked_indices",
    "_dynamo_strict_unbacked_indices",
    "_dynamo_static_indices",
    "_has_dynamo_dim_marking",
)


def _strip_marks(args: tuple) -> list[tuple[torch.Tensor, str, Any]]:
    """Drop Dynamo's dimension marks from the arguments before a saved step's guard check.

    A saved step's guards record the example tensors without their marks (they do not survive
    pickling), so a marked argument would fail them ("mark present at run time, absent at compile
    time"). The marks only steer a trace; the saved graph's symbolic sizes and their range guards
    stay, and the signature already separated marked from unmarked arguments."""
    removed = []
    for a in args:
        if isinstance(a, torch.Tensor):
            for name in _MARKS:
                if name in a.__dict__:
                    removed.append((a, name, a.__dict__.pop(name)))
    return removed


def _restore_marks(removed: list[tuple[torch.Tensor, str, Any]]) -> None:
    for t, name, value in removed:
        setattr(t, name, value)


def usable(owner: Any) -> str | None:
    """None when ``owner``'s steps can be saved, else why not."""
    recipe = owner.recipe
    if not recipe.runtime.step_cache:
        return "runtime.step_cache is off"
    if importlib.util.find_spec("torch._dynamo.aot_compile") is None or not all(
        hasattr(torch.compiler, f) for f in ("keep_portable_guards_unsafe", "load_compiled_function")
    ):
        return f"torch {torch.__version__} has no aot_compile"
    if recipe.lowering.backend != "inductor":
        return f"lowering.backend {recipe.lowering.backend!r} (saved steps need inductor)"
    if recipe.parallel.mode != "none":
        return f"parallel.mode {recipe.parallel.mode!r}"
    if owner.device.type != "cpu":
        return "device graphs (CUDA/HIP graphs are set up per process)"
    return None


class StepCache:
    """Callable like ``compile_step(fn, backend)``: ``fn`` is a bound method of ``owner``."""

    def __init__(self, fn: Callable, backend: Any, owner: Any, arg_names: tuple[str, ...]):
        self.fn, self.backend, self.owner = fn, backend, owner
        self.arg_names = arg_names
        self.dir = step_cache_root() / model_key(owner, fn.__name__)
        self.entries: dict[tuple, list[Any]] = {}
        # Signatures whose capture failed are traced by Dynamo; the others keep their saved steps (one
        # failing graph used to send every later call, prefill included, back through a Dynamo re-trace).
        self.traced: set[tuple] = set()
        self.fallback: Callable | None = None
        self.loaded = self.saved = 0

    def __call__(self, *args: Any) -> Any:
        sig = _signature(args)
        if sig in self.traced:
            return self.fallback(*args)
        entries = self._entries(sig)
        full = (self.owner, *args)
        if entries:
            marks = _strip_marks(args)
            for f in entries:
                if f.guard_check(*full):
                    return f(*full)
            _restore_marks(marks)  # the capture below must see them
        try:
            f = self._capture(args)
        except Exception as e:  # noqa: BLE001 — any capture failure: trace the usual way instead
            log.warning(
                "zycompile: step %s %s not saved (%s: %s); compiling it with Dynamo",
                self.fn.__name__,
                _describe(sig),
                type(e).__name__,
                e,
            )
            self.traced.add(sig)
            if self.fallback is None:
                self.fallback = compile_step(self.fn, self.backend)
            return self.fallback(*args)
        entries.append(f)
        self._save(sig, f, len(entries) - 1)
        return f(*full)

    def has_saved(self, *args: Any) -> bool:
        """Whether a saved step exists for these arguments (one failing its guards is still rebuilt)."""
        return bool(self._entries(_signature(args)))

    def _entries(self, sig: tuple) -> list[Any]:
        """The steps held for ``sig``, read from disk the first time it is asked for."""
        entries = self.entries.get(sig)
        if entries is None:
            entries = self.entries[sig] = self._load(sig)
        return entries

    def _load(self, sig: tuple) -> list[Any]:
        out = []
        for path in sorted(self.dir.glob(f"{_stem(sig)}-*.bin")):
            try:
                with open(path, "rb") as fh:
                    f = torch.compiler.load_compiled_function(fh)
            except Exception as e:  # noqa: BLE001 — a corrupt or stale entry is rebuilt, not fatal
                log.warning("zycompile: ignoring unreadable saved step %s (%s)", path, e)
                path.unlink(missing_ok=True)
                continue
            f.disable_guard_check()  # checked once per call by __call__
            out.append(f)
            self.loaded += 1
        return out

    def _capture(self, args: tuple) -> Any:
        names = set(self.arg_names)

        def keep(entries):
            # Portable guards only (tensor metadata, symbolic shape ranges, grad mode and the like),
            # and of the tensor guards only the step's arguments': the frozen model is not guarded.
            # With nothing else kept, Dynamo saves no references to the model's Python objects.
            portable = torch.compiler.keep_portable_guards_unsafe(entries)
            return [
                ok
                and (
                    e.guard_type in ("GLOBAL_STATE", "SHAPE_ENV")
                    or (m := re.match(r"[A-Za-z_]\w*", e.name)) is not None
                    and m.group(0) in names
                )
                for ok, e in zip(portable, entries)
            ]

        compiled = torch.compile(
            self.fn, backend=self.backend, fullgraph=True, dynamic=False, options={"guard_filter_fn": keep}
        )
        self.backend.saving = True
        try:
            f = compiled.aot_compile((args, {}))
        finally:
            self.backend.saving = False
        f.disable_guard_check()
        return f

    def _save(self, sig: tuple, f: Any, n: int) -> None:
        stem = _stem(sig)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{stem}-{n}.{os.getpid()}.tmp"
            f.save_compiled_function(str(tmp))
            tmp.replace(self.dir / f"{stem}-{n}.bin")  # atomic: a reader never sees half a file
            self.saved += 1
        except Exception as e:  # noqa: BLE001 — not savable: it still runs in this process
            log.warning("zycompile: could not save compiled step %s (%s)", self.fn.__name__, e)


def compile_verb(compiled: Callable, *args: Any) -> str:
    """What a first call of ``compiled`` with ``args`` does, for progress messages."""
    saved = getattr(compiled, "has_saved", None)  # a StepCache; compile_step's functions have none
    return "loading saved" if saved and saved(*args) else "compiling"


def compile_cached_step(fn: Callable, backend: Any, owner: Any, arg_names: tuple[str, ...]) -> Callable:
    """A ``StepCache`` where steps can be saved, else ``compile_step`` (Dynamo traces each process)."""
    why = usable(owner)
    if why is not None:
        log.debug("zycompile: step cache not used: %s", why)
        return compile_step(fn, backend)
    return StepCache(fn, backend, owner, arg_names)
