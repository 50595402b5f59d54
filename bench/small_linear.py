"""The C++ small_linear kernel against F.linear (BLAS) on SmolLM2's decode GEMM shapes, per row count.

Each shape's weight is rotated over ~100 MB of copies so no call finds it in cache (a decode step reads
every weight once); time per call is the best of 3 passes, interleaved per shape. "model GEMMs" sums one
decode step's worth: 30 layers x (fused q/k/v, o, fused gate/up, down) + the LM head. Appends the table
to bench/RESULTS.md.

    python bench/small_linear.py [--m 1 2 4 8 16] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish
from zycompile.ops import cpu_kernels

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# (K, N, calls per decode step) for SmolLM2-135M after fuse_projections
SHAPES = [(576, 960, 30), (576, 576, 30), (576, 3072, 30), (1536, 576, 30), (576, 49152, 1)]


def best_per_call(fn, ws) -> float:
    for w in ws[:2]:
        fn(w)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for w in ws:
            fn(w)
        best = min(best, (time.perf_counter() - t0) / len(ws))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    why = cpu_kernels.build()
    if why is not None:
        sys.exit(f"small_linear: the C++ kernels could not be built ({why})")
    kernel = torch.ops.zycompile_cpu.small_linear.default
    rows = []
    for m in args.m:
        total = {"blas": 0.0, "kernel": 0.0}
        gbs = {"blas": [], "kernel": []}
        for k, n, calls in SHAPES:
            ws = [torch.randn(n, k) for _ in range(max(2, int(100e6 / (n * k * 4))))]
            x = torch.randn(m, k)
            torch.testing.assert_close(kernel(x, ws[0]), F.linear(x, ws[0]), rtol=1e-4, atol=1e-3)
            for name, fn in (
                ("blas", lambda w, x=x: F.linear(x, w)),
                ("kernel", lambda w, x=x: kernel(x, w)),
            ):
                t = best_per_call(fn, ws)
                total[name] += t * calls
                gbs[name].append(n * k * 4 / t / 1e9)
        rows.append((m, total, gbs))
        print(f"M={m}: BLAS {total['blas'] * 1e3:.1f} ms, kernel {total['kernel'] * 1e3:.1f} ms", flush=True)
    lines = [
        f"\n## small_linear kernel vs BLAS, SmolLM2 decode GEMMs — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python bench/small_linear.py {' '.join(sys.argv[1:])}` — {machine_line()}; fp32, weights rotated "
        "over ~100 MB (cold), best of 3 passes; one decode step's GEMMs (30 layers + LM head)",
        "",
        "| M | BLAS (ms) | kernel (ms) | kernel vs BLAS | kernel GB/s per shape (min-max) |",
        "|---|---|---|---|---|",
    ]
    for m, total, gbs in rows:
        lines.append(
            f"| {m} | {total['blas'] * 1e3:.1f} | {total['kernel'] * 1e3:.1f} | "
            f"{total['blas'] / total['kernel']:.2f}x | {min(gbs['kernel']):.1f}-{max(gbs['kernel']):.1f} |"
        )
    publish(lines, None if args.no_write else RESULTS)


if __name__ == "__main__":
    main()
