"""Export a compiled model (AOTInductor packages + safetensors + manifest) and load it back."""

from zycompile.export.package import PackageError, read_manifest, write_package
from zycompile.export.runtime import LoadedModel, load

__all__ = ["LoadedModel", "PackageError", "load", "read_manifest", "write_package"]
