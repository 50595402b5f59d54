"""zycompile: compile Hugging Face causal LMs for fast serving."""

from zycompile.errors import GenerationError, ModelLoadError, RecipeError, ZyError

__all__ = ["GenerationError", "ModelLoadError", "RecipeError", "ZyError"]
__version__ = "0.1.0"
