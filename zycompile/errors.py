"""Errors users see. Each names the problem: file, key, value, what is allowed."""


class ZyError(Exception):
    """Base class of every error zycompile raises on purpose."""


class RecipeError(ZyError):
    """A recipe file or override is malformed, unknown or inconsistent."""


class ModelLoadError(ZyError):
    """A model source could not be found, read or converted."""


class GenerationError(ZyError):
    """A generation request is invalid (empty prompt, too long, bad sampling params)."""


class TuningDBError(ZyError):
    """A GEMM tuning database is missing, corrupted, or was made on another device or software version."""
