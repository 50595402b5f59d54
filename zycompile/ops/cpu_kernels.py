"""zycompile's C++ kernels for CPU (``csrc/*.cpp``), built into one extension on first use.

Built with ``torch.utils.cpp_extension`` (needs a C++ compiler and ninja; the build is cached per
machine, ~35 s from scratch on 2 cores), for the vector ISA ATen itself dispatches to here, as
Inductor's C++ kernels are. Each user of a kernel has its own fallback when the build fails
(``cpu_decode_attention``: SDPA; ``small_gemm``: Inductor's reductions) and says so once.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

SOURCES = [
    Path(__file__).with_name("csrc") / n
    for n in ("decode_attention.cpp", "small_linear.cpp", "panel_linear.cpp")
]

_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


@functools.cache
def build() -> str | None:
    """Build or load the extension (its ops land in ``torch.ops.zycompile_cpu``); None if it is there,
    else why not (``load_extension``)."""
    isa = _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    flags = ["-O3", "-ffp-contract=fast", "-fopenmp", *isa]  # OpenMP: at::parallel_for
    tries = [flags]
    if isa[:1] == ["-DCPU_CAPABILITY_AVX512"] and getattr(torch.cpu, "_is_avx512_bf16_supported", bool)():
        # panel_linear's bf16 pairs (vdpbf16ps) first; a compiler without the flag must not cost the rest
        tries.insert(0, [*flags, "-mavx512bf16", "-DZY_DPBF16"])
    for cflags in tries:
        if (why := load_extension("zycompile_cpu_kernels", SOURCES, cflags, ["-fopenmp"])) is None:
            break
    if why is None:
        _register_fakes()
        if os.environ.get("ZYCOMPILE_WEIGHT_CODES", "1") == "0":  # keep fp32 copies (an A/B, a bug hunt)
            torch.ops.zycompile_cpu.panel_codes.default(False)
    return why


def load_extension(name: str, sources, cflags: list[str], ldflags: list[str] = ()) -> str | None:
    """Build or load a C++ extension of torch ops; None if loaded, else why not: the compiler's first
    ``error`` line, else the exception's first line."""
    try:
        from torch.utils.cpp_extension import load

        load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_ldflags=list(ldflags),
            is_python_module=False,
            verbose=False,
        )
        return None
    except Exception as e:  # no compiler, no ninja, a header mismatch, a missing symbol: callers fall back
        lines = str(e).strip().splitlines()
        return next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else type(e).__name__)


# The C++ kernel's row limit (csrc/small_linear.cpp MAX_M); callers route more rows elsewhere.
SMALL_LINEAR_MAX_M = 16
# The small-GEMM ops (``zycompile_cpu::<name>``) the small_gemm pass writes into graphs as direct calls.
SMALL_GEMM_OPS = ("small_linear", "panel_linear")
# The dtypes each takes (panel_linear keeps its copy in the weight's dtype; bf16 accumulates in fp32).
SMALL_GEMM_DTYPES = {"small_linear": (torch.float32,), "panel_linear": (torch.float32, torch.bfloat16)}
# The op each ``small_gemm`` ``kernel`` option writes (``reduction``: none, Inductor's reductions).
SMALL_GEMM_KERNEL_OPS = {"auto": "panel_linear", "rows": "small_linear"}


def coded_bytes(w: torch.Tensor) -> int | None:
    """Bytes of the coded copy ``panel_linear`` keeps of fp32 weight ``w`` (csrc/panel_codes.h: its
    values are GGUF block codes), or None where it keeps the fp32 copy (other values, codes switched
    off, not AVX-512, no kernels). What a decode step streams, for MBU."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.device.type != "cpu" or build() is not None:
        return None
    with torch.no_grad():
        return torch.ops.zycompile_cpu.panel_coded_bytes.default(w.detach()) or None


def codes_in_use() -> bool:
    """Whether ``panel_linear`` has made a coded copy in this process (a model's graphs stream codes)."""
    return build() is None and torch.ops.zycompile_cpu.panel_cache_coded.default() > 0


@functools.cache  # once per process: a rebuild after ``build.cache_clear`` must not register again
def _register_fakes() -> None:
    """Shapes for tracing."""

    def linear(x, w, bias=None):
        return x.new_empty(x.shape[0], w.shape[0])

    for name in (*SMALL_GEMM_OPS, "panel_linear_f16"):  # they go into compiled graphs as they are
        torch.library.register_fake(f"zycompile_cpu::{name}", linear)
