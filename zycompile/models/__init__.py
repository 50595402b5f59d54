"""Model loading: the bundled default, tiny random configs, local HF dirs, GGUF files, cached HF ids."""

from zycompile.models.bundled import BUNDLED, cache_entry_dir, cache_root, ensure_cached, validate_cache_entry
from zycompile.models.loader import DTYPES, LoadedModel, available_models, load_model, resolve_dtype
from zycompile.models.tiny import TINY_CONFIGS, build_tiny, parse_tiny_source, tiny_config

__all__ = [
    "BUNDLED",
    "DTYPES",
    "TINY_CONFIGS",
    "LoadedModel",
    "available_models",
    "build_tiny",
    "cache_entry_dir",
    "cache_root",
    "ensure_cached",
    "load_model",
    "parse_tiny_source",
    "resolve_dtype",
    "tiny_config",
    "validate_cache_entry",
]
