"""Weights whose owner asked for an fp16 panel copy (``zycompile_cpu::panel_linear_f16``, fp32 math).

For the EAGLE draft head: every round calls it beside a verify, and a call reads all of its weights
(``fc``, one decoder layer, the draft-vocabulary head: ~36 MB in fp32 for SmolLM2), so its cost is
their bytes. Drafts need only be likely, not exact (the target verifies every one), and the head's
own weights are fp16 values on disk, so an fp16 copy changes none of their products.

The owner marks the weights' storage (``mark``) before its graphs are compiled; the ``small_gemm``
pass then calls the fp16 op instead of ``panel_linear`` for a weight in a marked storage (a fused
q/k/v view included). Marks are weak: a freed model's storage is forgotten.
"""

from __future__ import annotations

import weakref

import torch

_MARKED: dict[int, weakref.ref] = {}  # storage address -> a tensor that holds that storage


def mark(tensors) -> int:
    """Ask for fp16 copies of these fp32 CPU tensors' storage; returns how many were marked."""
    n = 0
    for t in tensors:
        if t.device.type == "cpu" and t.dtype == torch.float32:
            _MARKED[t.untyped_storage().data_ptr()] = weakref.ref(t)
            n += 1
    return n


def wants_half(t: torch.Tensor) -> bool:
    """Whether ``t`` lies in a storage some owner marked (and that storage is still the marked one)."""
    ptr = t.untyped_storage().data_ptr()
    ref = _MARKED.get(ptr)
    held = ref() if ref is not None else None
    if held is None or held.untyped_storage().data_ptr() != ptr:
        _MARKED.pop(ptr, None)
        return False
    return True
