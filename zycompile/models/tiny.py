"""Tiny random-weight models for tests and smoke runs: `tiny:<arch>[?key=value&...]`.

Same module structure as the real architectures (GQA attention, SwiGLU MLP, RMSNorm, RoPE; Qwen3-MoE's
routed experts) at a size that runs a forward pass in milliseconds on CPU, so passes and the runtime are
tested on every family without downloading anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from zycompile.errors import ModelLoadError

TINY_PREFIX = "tiny:"

TINY_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "qwen3_moe": Qwen3MoeConfig,
}

# Shared by every architecture; a key the config class has no field for is dropped (Qwen2 has no
# `head_dim`: it derives hidden_size / num_attention_heads = 16 itself).
TINY_DEFAULTS: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: two query heads per KV head
    "head_dim": 16,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


# Per-architecture additions: the MoE has 8 experts of 32 (top-2 routed), every layer sparse.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
}


def tiny_names() -> list[str]:
    return [TINY_PREFIX + arch for arch in TINY_CONFIGS]


def _config_fields(config_cls: type[PretrainedConfig]) -> set[str]:
    # transformers 5 configs are dataclasses; their fields are exactly the keys the class understands
    # (it would otherwise silently store a misspelt kwarg as an extra attribute).
    if dataclasses.is_dataclass(config_cls):
        return {f.name for f in dataclasses.fields(config_cls)}
    return set(vars(config_cls()))


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_tiny_source(source: str) -> tuple[str, dict[str, Any]]:
    """`"tiny:llama?num_hidden_layers=3"` -> `("llama", {"num_hidden_layers": 3})`, validated."""
    spec = source[len(TINY_PREFIX) :]
    arch, _, query = spec.partition("?")
    if arch not in TINY_CONFIGS:
        raise ModelLoadError(
            f"unknown tiny architecture '{arch}' in '{source}'; allowed: {', '.join(tiny_names())}"
        )
    config_cls = TINY_CONFIGS[arch]
    fields = _config_fields(config_cls)
    overrides: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ModelLoadError(f"bad tiny override '{item}' in '{source}'; expected key=value")
        if key not in fields:
            common = ", ".join(k for k in TINY_DEFAULTS if k in fields)
            raise ModelLoadError(
                f"unknown tiny override key '{key}' in '{source}': {config_cls.__name__} has no such field "
                f"(common keys: {common})"
            )
        if key in overrides:
            raise ModelLoadError(f"tiny override key '{key}' given twice in '{source}'")
        overrides[key] = _parse_value(value.strip())
    return arch, overrides


def tiny_config(arch: str, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    config_cls = TINY_CONFIGS[arch]
    fields = _config_fields(config_cls)
    kwargs = {k: v for k, v in TINY_DEFAULTS.items() if k in fields}
    kwargs.update(ARCH_DEFAULTS.get(arch, {}))
    kwargs.update(overrides or {})
    heads, kv_heads = kwargs.get("num_attention_heads"), kwargs.get("num_key_value_heads")
    # Checked here because the model would only fail later, deep inside a forward pass.
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads <= 0 or heads % kv_heads):
        raise ModelLoadError(
            f"tiny:{arch}: num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads}"
        )
    try:
        config = config_cls(**kwargs)
    except Exception as e:  # the config's own validation: report it in one line
        raise ModelLoadError(f"tiny:{arch} config with {overrides or {}} is invalid: {e}") from None
    config._attn_implementation = "sdpa"
    return config


def build_tiny(source: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """A random-weight model in eval mode; the same source and seed always give the same weights."""
    arch, overrides = parse_tiny_source(source)
    config = tiny_config(arch, overrides)
    # fork_rng: deterministic weights without moving the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            # Built in float32, then cast, so a bf16 model holds the rounded fp32 weights of the same seed.
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        except Exception as e:
            raise ModelLoadError(f"tiny:{arch} with {overrides} failed to build: {e}") from None
    return model.to(dtype).eval()
