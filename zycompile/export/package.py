"""Write and verify a compiled-model package: AOTInductor .pt2 graphs + safetensors weights + manifest.

Layout of ``DIR``::

    manifest.json          versions, device, recipe hash, model geometry, graphs, sha256 of every file
    recipe.yaml            the resolved recipe
    weights.safetensors    every constant the graphs read except the KV cache (tied weights stored once)
    decode_b{B}.pt2        one AOTInductor package per batch bucket (static shapes)
    prefill.pt2            dynamic batch and length
    tokenizer/             the tokenizer's files, when the model has one

The .pt2 files are built with ``aot_inductor.package_constants_in_so = False``: weights live once, in
the safetensors file, and the loader hands the same tensors to every graph (``load_constants``).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from zycompile.errors import ZyError

MANIFEST = "manifest.json"
FORMAT = 1


class PackageError(ZyError):
    """A package that is incomplete, tampered with, or built for another device / torch version."""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from zycompile.bench.machine import cpu_model

    return f"{cpu_model()} ({platform.machine()})"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_package(opt, out_dir: str | Path, progress=None) -> Path:
    """Export ``opt`` (an OptimizedModel) to ``out_dir``; returns the manifest path."""
    from safetensors.torch import save_file

    from zycompile.export.step_module import CACHE_K, CACHE_V, KEY_POS, export_programs

    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = opt.generator()
    if opt.recipe.parallel.mode != "none":
        raise PackageError(
            f"export: parallel.mode '{opt.recipe.parallel.mode}' is not exportable yet; export a single-device recipe"
        )
    t0 = time.perf_counter()
    say("exporting graphs (torch.export)")
    programs = export_programs(gen)
    graphs, constants = {}, {}
    configs = {"aot_inductor.package_constants_in_so": False, **dict(opt.recipe.lowering.options)}
    for name, ep in programs.items():
        say(f"compiling {name} with AOTInductor")
        t1 = time.perf_counter()
        torch._inductor.aoti_compile_and_package(
            ep, package_path=str(out / f"{name}.pt2"), inductor_configs=configs
        )
        graphs[name] = {"file": f"{name}.pt2", "compile_s": round(time.perf_counter() - t1, 1)}
        state = {**ep.state_dict, **ep.constants}
        for fqn in ep.graph_signature.parameters + ep.graph_signature.buffers:
            constants[fqn] = state[fqn]
    cache_names = {CACHE_K.format(i) for i in range(len(gen.cache.keys))}
    cache_names |= {CACHE_V.format(i) for i in range(len(gen.cache.keys))} | {KEY_POS}
    weights, aliases = _dedupe({k: v for k, v in constants.items() if k not in cache_names})
    save_file(weights, str(out / "weights.safetensors"))
    if opt.tokenizer is not None:
        opt.tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / "recipe.yaml").write_text(opt.recipe.to_yaml())
    cfg = gen.model.config
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "zycompile": __import__("zycompile").__version__,
        "torch": torch.__version__,
        "device": {"type": gen.device.type, "name": device_name(gen.device)},
        "recipe_hash": opt.recipe.compute_hash(),
        "model": {"source": opt.recipe.model.source, "dtype": str(gen.dtype).removeprefix("torch.")},
        "eos_token_ids": sorted(gen.eos_ids()),
        "vocab_size": cfg.vocab_size,
        "runtime": {
            "max_seq_len": gen.max_seq_len,
            "batch_buckets": list(gen.batch_buckets),
            "prefill_chunk": gen.prefill_buckets[-1],
        },
        "cache": {
            "layers": len(gen.cache.keys),
            "k_shape": list(gen.cache.keys[0].shape),
            "v_shape": list(gen.cache.values[0].shape),
            "dtype": str(gen.cache.keys[0].dtype).removeprefix("torch."),
        },
        "graphs": graphs,
        "weight_aliases": aliases,
        "build_s": round(time.perf_counter() - t0, 1),
    }
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest["files"] = {str(p.relative_to(out)): sha256(p) for p in files}
    manifest["bytes"] = {str(p.relative_to(out)): p.stat().st_size for p in files}
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One contiguous copy per distinct tensor; names that share one (tied weights) become aliases."""
    by_key: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name in sorted(tensors):
        t = tensors[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in by_key:
            aliases[name] = by_key[key]
            continue
        by_key[key] = name
        unique[name] = t.detach().contiguous().clone()
    return unique, aliases


def read_manifest(pkg: str | Path, device: torch.device | str | None = None) -> dict[str, Any]:
    """Check the package before anything loads: every file present and unmodified, same torch, same device."""
    pkg = Path(pkg)
    path = pkg / MANIFEST
    if not path.is_file():
        raise PackageError(f"{path}: missing; not a zycompile package (build one with `zycompile export`)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PackageError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise PackageError(
            f"{path}: package format {manifest.get('format')!r}; this zycompile reads {FORMAT}"
        )
    if manifest["torch"] != torch.__version__:
        raise PackageError(
            f"{path}: built with torch {manifest['torch']}, running torch {torch.__version__}; "
            "AOTInductor packages are tied to the torch version: re-export with this one"
        )
    dev = torch.device(device or manifest["device"]["type"])
    here = device_name(dev) if dev.type != "cuda" or torch.cuda.is_available() else "no CUDA device"
    if manifest["device"]["type"] != dev.type or manifest["device"]["name"] != here:
        raise PackageError(
            f"{path}: built for {manifest['device']['type']} '{manifest['device']['name']}', this machine has "
            f"{dev.type} '{here}'; re-export on this device"
        )
    for rel, digest in files.items():
        f = pkg / rel
        if not f.is_file():
            raise PackageError(f"{f}: missing (listed in {MANIFEST}); the package is incomplete")
        if sha256(f) != digest:
            raise PackageError(f"{f}: sha256 differs from {MANIFEST}; the file was modified or corrupted")
    return manifest
