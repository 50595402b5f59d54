"""Custom ops (torch.library) that passes rewrite graphs into. Importing registers them."""

from zycompile.ops import attention, grouped_mm, overlap_ops, tree_attention, tuned_linear  # noqa: F401
