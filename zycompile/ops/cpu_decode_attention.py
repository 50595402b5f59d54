"""The C++ decode/verify attention kernel for CPU (``csrc/decode_attention.cpp``), built on first use.

SDPA's CPU flash kernel is tuned for long query blocks: for a decode step (one query per row) it costs
~140 µs per layer at batch 8 on this 2-core box, and the Python work that trims the static cache's empty
tail (``attention._visible_keys``) adds 10-30 µs more. The kernel reads the mask itself and each query's
visible keys only, in one call. Built with ``torch.utils.cpp_extension`` (needs a C++ compiler and
ninja; the build is cached per machine). If it cannot be built, attention falls back to SDPA and says so
once. ``ZYCOMPILE_CPU_ATTENTION=sdpa`` turns it off (for A/B runs).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.cpp"
MAX_QUERIES = 16  # longer query blocks (prefill chunks) are compute-bound: SDPA's flash kernel wins there

# Compile for the vector ISA ATen itself dispatches to here, as Inductor's C++ kernels do.
_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


ENABLED = os.environ.get("ZYCOMPILE_CPU_ATTENTION", "kernel") != "sdpa"  # read once: checked every call


@functools.cache
def load() -> torch._ops.OpOverload | None:
    """The ``zycompile_cpu::decode_attention`` op, building it if needed; None (said once) if it cannot be."""
    try:
        from torch.utils.cpp_extension import load_inline

        isa = _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
        load_inline(
            name="zycompile_decode_attention",
            cpp_sources=[SOURCE.read_text()],
            extra_cflags=["-O3", "-ffp-contract=fast", "-fopenmp", *isa],  # OpenMP: at::parallel_for
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return torch.ops.zycompile_cpu.decode_attention.default
    except Exception as e:  # no compiler, no ninja, a header mismatch: SDPA still gives the right answer
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"zycompile: CPU decode-attention kernel unavailable ({reason}); using SDPA", file=sys.stderr)
        return None


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the kernel handles this call: CPU fp32, a short query block, a boolean mask or none."""
    return (
        ENABLED
        and q.device.type == "cpu"
        and q.shape[-2] <= MAX_QUERIES
        and q.dtype == k.dtype == v.dtype == torch.float32
        and (mask is None or mask.dtype == torch.bool)
    )
