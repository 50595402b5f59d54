"""zycompile: compile Hugging Face causal LMs for fast serving."""

from zycompile.api import OptimizedModel, optimize
from zycompile.errors import GenerationError, ModelLoadError, RecipeError, ZyError
from zycompile.recipe import Recipe, load_recipe


def load(path, device=None):
    """Load a package written by ``OptimizedModel.export`` / ``zycompile export`` (verified first)."""
    from zycompile.export import load as _load

    return _load(path, device)


__all__ = [
    "GenerationError",
    "ModelLoadError",
    "OptimizedModel",
    "Recipe",
    "RecipeError",
    "ZyError",
    "load",
    "load_recipe",
    "optimize",
]
__version__ = "0.1.0"
