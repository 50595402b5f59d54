"""The C++ decode/verify attention kernel for CPU (``csrc/decode_attention.cpp``), built on first use.

SDPA's CPU flash kernel is tuned for long query blocks: for a decode step (one query per row) it costs
~140 µs per layer at batch 8 on this 2-core box, and the Python work that trims the static cache's empty
tail (``attention._visible_keys``) adds 10-30 µs more. The kernel reads the mask itself and each query's
visible keys only, in one call. Built with the other CPU kernels (``cpu_kernels``); if they cannot be
built, attention falls back to SDPA and says so once. ``ZYCOMPILE_CPU_ATTENTION=sdpa`` turns it off
(for A/B runs).
"""

from __future__ import annotations

import functools
import os
import sys

import torch

from zycompile.ops import cpu_kernels

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # bf16 K/V widened as loaded, fp32 math
MAX_QUERIES = 16  # longer query blocks (prefill chunks) are compute-bound: SDPA's flash kernel wins there

ENABLED = os.environ.get("ZYCOMPILE_CPU_ATTENTION", "kernel") != "sdpa"  # read once: checked every call


@functools.cache
def load() -> torch._ops.OpOverload | None:
    """The ``zycompile_cpu::decode_attention`` op, building it if needed; None (said once) if it cannot be."""
    why = cpu_kernels.build()
    if why is not None:  # SDPA still gives the right answer
        print(f"zycompile: CPU decode-attention kernel unavailable ({why}); using SDPA", file=sys.stderr)
        return None
    return torch.ops.zycompile_cpu.decode_attention.default


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the kernel handles this call: CPU fp32 or bf16, a short query block, a boolean mask or none."""
    return (
        ENABLED
        and q.device.type == "cpu"
        and q.shape[-2] <= MAX_QUERIES
        and q.dtype == k.dtype == v.dtype
        and q.dtype in KERNEL_DTYPES
        and (mask is None or mask.dtype == torch.bool)
    )
