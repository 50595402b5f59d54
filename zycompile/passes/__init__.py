"""Pass registry: recipe ``passes: [{name: ...}]`` entries name classes registered here."""

from __future__ import annotations

from zycompile.errors import RecipeError
from zycompile.passes.base import GraphPass, PassContext, PassResult

PASS_REGISTRY: dict[str, type[GraphPass]] = {}


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    PASS_REGISTRY[cls.name] = cls
    return cls


def get_pass_class(name: str) -> type[GraphPass]:
    try:
        return PASS_REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown pass {name!r} (allowed: {', '.join(sorted(PASS_REGISTRY))})") from None


# Importing the modules registers the built-in passes.
from zycompile.passes import (  # noqa: E402,F401
    canonicalize_attention,
    fuse_projections,
    overlap_comm,
    small_gemm,
    tree_attention,
    tuned_gemm,
    weight_layout,
)

__all__ = ["PASS_REGISTRY", "GraphPass", "PassContext", "PassResult", "get_pass_class", "register_pass"]
