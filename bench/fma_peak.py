"""The CPU's fp32 FMA ceiling: independent FMA chains in registers on every thread, no memory traffic.

No GEMM, attention or serving run can do fp32 math faster than this; RESULTS.md's c=8 / c=1 bound for
#4 divides the workload's FLOPs by it. (The bench's matmul peak, a 2048^3 torch.matmul, lands below it:
it moves data.) Appends one line to bench/RESULTS.md.

    python bench/fma_peak.py [--no-write]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# 16 accumulators a thread: more than FMA latency x issue width on any x86 core, all in registers.
SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <cstdint>
#if defined(__AVX512F__)
using V = __m512;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
constexpr int LANES = 16;
#else
using V = __m256;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
constexpr int LANES = 8;
#endif
double fma_gflops(int64_t iters) {
  const double t0 = omp_get_wtime();
  float sink = 0.f;
  int threads = 1;
#pragma omp parallel reduction(+ : sink)
  {
#pragma omp single
    threads = omp_get_num_threads();
    V a[16];
    for (int i = 0; i < 16; ++i) a[i] = SET1(1.0f + i * 1e-7f);
    const V x = SET1(0.999999f), y = SET1(1e-7f);  // converges to 0.1: no denormals, no overflow
    for (int64_t n = 0; n < iters; ++n) {
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) a[i] = FMA(a[i], x, y);
    }
    V s = a[0];
    for (int i = 1; i < 16; ++i) s = ADD(s, a[i]);
    float lanes[LANES];
    std::memcpy(lanes, &s, sizeof(lanes));
    for (float f : lanes) sink += f;
  }
  const double dt = omp_get_wtime() - t0;
  return sink == 12345.f ? -1.0 : 2.0 * 16 * LANES * static_cast<double>(iters) * threads / dt / 1e9;
}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    isa = ["-mavx512f"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else ["-mavx2", "-mfma"]
    mod = load_inline(
        "zycompile_fma_peak",
        cpp_sources="#include <cstring>\n" + SOURCE,
        functions=["fma_gflops"],
        extra_cflags=["-O3", "-fopenmp", *isa],
        extra_ldflags=["-fopenmp"],
    )
    runs = [mod.fma_gflops(20_000_000) for _ in range(10)]
    line = (
        f"\n## fp32 FMA peak — {time.strftime('%Y-%m-%d %H:%M')}\n\n`python bench/fma_peak.py` — "
        f"{machine_line()}: **{max(runs):.1f} GFLOP/s** (best of 10; median {sorted(runs)[5]:.1f}), "
        f"16 register FMA chains on each of {torch.get_num_threads()} threads"
    )
    publish([line], None if args.no_write else RESULTS)


if __name__ == "__main__":
    main()
