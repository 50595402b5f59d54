"""Write and verify a compiled-model package: AOTInductor .pt2 graphs + safetensors weights + manifest.

Layout of ``DIR``::

    manifest.json          versions, device, recipe hash, model geometry, graphs, sha256 of every file
    recipe.yaml            the resolved recipe
    weights.safetensors    every constant the graphs read except the KV cache: each storage once, as
                           the span its views use (manifest ``weights`` rebuilds the exact views)
    decode_b{B}.pt2        one AOTInductor package per batch bucket (static shapes)
    prefill.pt2            dynamic batch and length
    tokenizer/             the tokenizer's files, when the model has one

Each graph is the recipe's compiled model, not the raw step: the recipe's passes run on the exported
program before AOTInductor compiles it (``export/passes.py``); the manifest's ``passes`` lists each
pass per graph with its match count and notes, ``pass_warnings`` what could not apply and why.

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

    from zycompile.export.passes import apply_passes, exportable
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
    graphs, constants, pass_records = {}, {}, []
    recipe, warnings = exportable(opt.recipe)
    for msg in warnings:
        say(msg)
    pass_state: dict[str, Any] = {}  # shared by the graphs of one export, as ZyBackend.state is
    for index, (name, prog) in enumerate(programs.items()):
        say(f"{name}: applying the recipe's passes")
        applied = apply_passes(name, prog.ep, prog.args, prog.dynamic_shapes, recipe, index, pass_state, say)
        ep = applied.ep
        say(f"compiling {name} with AOTInductor ({applied.summary()})")
        configs = {
            "aot_inductor.package_constants_in_so": False,
            **dict(opt.recipe.lowering.options),
            "post_grad_custom_post_pass": applied.post_hook,  # the recipe's post-grad passes, as live
        }
        if applied.post_hook.manager:
            configs["fx_graph_cache"] = False  # a cached graph skips the post-grad passes and their report
        t1 = time.perf_counter()
        torch._inductor.aoti_compile_and_package(
            ep, package_path=str(out / f"{name}.pt2"), inductor_configs=configs
        )
        graphs[name] = {"file": f"{name}.pt2", "compile_s": round(time.perf_counter() - t1, 1)}
        pass_records += applied.records(name)  # after the compile: the post-grad passes ran inside it
        warnings += [f"{name}: {w}" for w in applied.warnings]
        state = {**ep.state_dict, **ep.constants}
        for fqn in ep.graph_signature.parameters + ep.graph_signature.buffers:
            _add_constant(constants, fqn, state[fqn], name)
    cache_names = {CACHE_K.format(i) for i in range(len(gen.cache.keys))}
    cache_names |= {CACHE_V.format(i) for i in range(len(gen.cache.keys))} | {KEY_POS}
    spans, views = _by_storage({k: v for k, v in constants.items() if k not in cache_names})
    save_file(spans, str(out / "weights.safetensors"))
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
        # what the live compile report says, per exported graph: every pass run, its match count and notes
        "passes": pass_records,
        "pass_warnings": warnings,
        "weights": views,
        "build_s": round(time.perf_counter() - t0, 1),
    }
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest["files"] = {str(p.relative_to(out)): sha256(p) for p in files}
    manifest["bytes"] = {str(p.relative_to(out)): p.stat().st_size for p in files}
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


def _add_constant(constants: dict[str, torch.Tensor], fqn: str, t: torch.Tensor, graph: str) -> None:
    """Every graph reads one ``weights.safetensors``: a name two graphs use must be the same tensor view."""
    seen = constants.setdefault(fqn, t)
    same = (seen.untyped_storage().data_ptr(), seen.storage_offset(), seen.shape, seen.stride()) == (
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        t.shape,
        t.stride(),
    )
    if not same:
        raise PackageError(
            f"export: graph {graph} names constant '{fqn}' for another tensor than an earlier graph; "
            "the graphs cannot share one weights file"
        )


def _by_storage(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Save each underlying storage once, as the 1-D span its tensors use; keep every tensor's view.

    The graphs were compiled for the exact strides and offsets of their constants (K-major weights,
    q/k/v views into one fused buffer, tied embeddings), so a loader must rebuild those views, not
    contiguous copies. Returns (``storage{i}`` -> 1-D tensor, name -> {storage, offset, shape, stride}).
    """
    groups: dict[tuple, list[str]] = {}
    for name in sorted(tensors):
        t = tensors[name]
        groups.setdefault((t.untyped_storage().data_ptr(), t.dtype), []).append(name)
    spans, views = {}, {}
    for i, names in enumerate(groups.values()):
        ts = [tensors[n] for n in names]
        lo = min(t.storage_offset() for t in ts)
        hi = max(t.storage_offset() + sum((d - 1) * st for d, st in zip(t.shape, t.stride())) + 1 for t in ts)
        key = f"storage{i}"
        spans[key] = ts[0].as_strided((hi - lo,), (1,), lo).detach().clone()
        for n, t in zip(names, ts):
            views[n] = {
                "storage": key,
                "offset": t.storage_offset() - lo,
                "shape": list(t.shape),
                "stride": list(t.stride()),
            }
    return spans, views


def rebuild_views(spans: dict[str, torch.Tensor], views: dict[str, dict]) -> dict[str, torch.Tensor]:
    return {n: spans[v["storage"]].as_strided(v["shape"], v["stride"], v["offset"]) for n, v in views.items()}


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
