"""zycompile: compile Hugging Face causal LMs for fast serving."""

from zycompile.api import OptimizedModel, optimize
from zycompile.errors import GenerationError, ModelLoadError, RecipeError, ZyError
from zycompile.recipe import Recipe, load_recipe

__all__ = [
    "GenerationError",
    "ModelLoadError",
    "OptimizedModel",
    "Recipe",
    "RecipeError",
    "ZyError",
    "load_recipe",
    "optimize",
]
__version__ = "0.1.0"
