"""Run an exported package: ``zycompile.load(DIR).generate(...)`` without the model's Python code.

Loads the AOTInductor graphs, hands every graph the same weight tensors (from the safetensors file)
and the same KV-cache tensors (``load_constants(..., user_managed=True)``: the graphs write the
cache in place), and drives them with the runtime's own prefill/decode loop and sampling. Imports
no transformers model class (the tokenizer, if any, comes from ``AutoTokenizer``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import zycompile.ops  # noqa: F401  (the graphs call zycompile:: custom ops, e.g. attention, by name)
from zycompile.errors import GenerationError
from zycompile.export.package import MANIFEST, PackageError, read_manifest, rebuild_views
from zycompile.export.step_module import CACHE_K, CACHE_V, KEY_POS
from zycompile.runtime.generate import Generator


class _Cache:
    """The KV-cache tensors the graphs write (the generator loop only needs ``batch``)."""

    def __init__(self, spec: dict, max_seq_len: int, device: torch.device):
        dtype = getattr(torch, spec["dtype"])
        self.keys = [torch.zeros(spec["k_shape"], dtype=dtype, device=device) for _ in range(spec["layers"])]
        self.values = [
            torch.zeros(spec["v_shape"], dtype=dtype, device=device) for _ in range(spec["layers"])
        ]
        self.key_positions = torch.arange(max_seq_len, device=device)
        self.batch = spec["k_shape"][0]

    def named(self) -> dict[str, torch.Tensor]:
        out = {KEY_POS: self.key_positions}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            out[CACHE_K.format(i)], out[CACHE_V.format(i)] = k, v
        return out


class PackagedGenerator(Generator):
    """The runtime loop of ``Generator`` over AOTInductor graphs instead of a compiled HF module."""

    def __init__(
        self, pkg: Path, manifest: dict, runners: dict[str, Any], tokenizer: Any, device: torch.device
    ):
        rt = manifest["runtime"]
        self.opt, self.model, self.recipe, self.tokenizer = None, None, None, tokenizer
        self.manifest = manifest
        self.max_seq_len = rt["max_seq_len"]
        self.batch_buckets = rt["batch_buckets"]
        self.prefill_buckets = [rt["prefill_chunk"]]
        self.dynamic_prefill = True
        self.device, self.dtype = device, getattr(torch, manifest["model"]["dtype"])
        self.cache = _Cache(manifest["cache"], self.max_seq_len, device)
        self.runners = runners
        self.seen_shapes, self.on_compile, self.bandwidth = set(), None, None
        self.speculator = None  # verify graphs are not exported: a package decodes one token per step

    def prefill_keys(self, start, width):
        return None  # the exported prefill graph takes no key span: it reads every slot

    def step(self, input_ids, pos, last, rows=None, keys=None):
        if rows is not None:
            raise GenerationError(
                "a loaded package runs whole batches (rows=None); cache slots are not exported"
            )
        name = f"decode_b{input_ids.shape[0]}" if input_ids.shape[1] == 1 else "prefill"
        with torch.no_grad():
            out = self.runners[name](input_ids, pos, last)
        return out[0] if isinstance(out, (list, tuple)) else out

    def eos_ids(self) -> set[int]:
        return set(self.manifest["eos_token_ids"])

    def decode_mbu(self, steps_per_s, context_len, batch=1):
        return None  # the package keeps no module to count weight bytes from


class LoadedModel:
    """What ``zycompile.load`` returns: ``generate`` like an optimized model's, plus the manifest."""

    def __init__(self, generator: PackagedGenerator, manifest: dict, path: Path):
        self._generator = generator
        self.manifest, self.path = manifest, path
        self.tokenizer = generator.tokenizer

    def generator(self) -> PackagedGenerator:
        return self._generator

    def generate(self, prompts: Any, **kwargs: Any):
        return self._generator.generate(prompts, **kwargs)


def load(path: str | Path, device: str | torch.device | None = None) -> LoadedModel:
    """Verify then load a package written by ``OptimizedModel.export`` / ``zycompile export``."""
    from safetensors.torch import load_file

    pkg = Path(path)
    manifest = read_manifest(pkg, device)  # raises before anything is loaded
    dev = torch.device(device or manifest["device"]["type"])
    weights = rebuild_views(load_file(str(pkg / "weights.safetensors"), device=str(dev)), manifest["weights"])
    tokenizer = None
    if (pkg / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(pkg / "tokenizer"))
    gen = PackagedGenerator(pkg, manifest, {}, tokenizer, dev)
    state = {**weights, **gen.cache.named()}
    for name, info in manifest["graphs"].items():
        runner = torch._inductor.aoti_load_package(str(pkg / info["file"]))
        need = runner.get_constant_fqns()
        missing = [f for f in need if f not in state]
        if missing:
            raise PackageError(
                f"{pkg / info['file']}: needs constants missing from weights.safetensors: {missing[:5]}"
            )
        runner.load_constants({f: state[f] for f in need}, check_full_update=True, user_managed=True)
        gen.runners[name] = runner
    return LoadedModel(gen, manifest, pkg)


def describe(path: str | Path) -> str:
    m = json.loads((Path(path) / MANIFEST).read_text())
    size = sum(m["bytes"].values()) / 2**20
    counts: dict[str, int] = {}
    for r in m.get("passes", []):
        if r["stage"] == "pre_grad":
            counts[r["name"]] = counts.get(r["name"], 0) + r["matches"]
    passes = ", ".join(f"{k} x{v}" for k, v in counts.items()) or "none"
    return (
        f"{m['model']['source']} ({m['model']['dtype']}), {len(m['graphs'])} graphs, {size:.1f} MiB, "
        f"built in {m['build_s']}s; passes: {passes}"
    )
