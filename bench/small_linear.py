"""The C++ small-GEMM kernels (small_linear, panel_linear) against BLAS on SmolLM2's decode GEMMs.

Per row count M.

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


KERNELS = ("blas", "rows", "panel")  # F.linear, small_linear (row-major w), panel_linear (packed copy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    why = cpu_kernels.build()
    if why is not None:
        sys.exit(f"small_linear: the C++ kernels could not be built ({why})")
    ops = torch.ops.zycompile_cpu
    rows = []
    for m in args.m:
        # small_linear takes at most SMALL_LINEAR_MAX_M rows: past that its column reads "-"
        kernels = [k for k in KERNELS if k != "rows" or m <= cpu_kernels.SMALL_LINEAR_MAX_M]
        total = dict.fromkeys(kernels, 0.0)
        gbs: dict[str, list[float]] = {name: [] for name in kernels}
        for k, n, calls in SHAPES:
            ws = [torch.randn(n, k) for _ in range(max(2, int(100e6 / (n * k * 4))))]
            x = torch.randn(m, k)
            fns = {
                "blas": lambda w, x=x: F.linear(x, w),
                "rows": lambda w, x=x: ops.small_linear.default(x, w),
                "panel": lambda w, x=x: ops.panel_linear.default(x, w),  # packs each copy on its first call
            }
            for name in kernels[1:]:
                torch.testing.assert_close(fns[name](ws[0]), F.linear(x, ws[0]), rtol=1e-4, atol=1e-3)
            for name in kernels:
                t = best_per_call(fns[name], ws)
                total[name] += t * calls
                gbs[name].append(n * k * 4 / t / 1e9)
            del ws  # and with them their panel copies (dropped when the next weight is packed)
        rows.append((m, total, gbs))
        print(f"M={m}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in total.items()), flush=True)
    lines = [
        f"\n## small-GEMM kernels vs BLAS, SmolLM2 decode GEMMs — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python bench/small_linear.py {' '.join(sys.argv[1:])}` — {machine_line()}; fp32, weights rotated "
        "over ~100 MB (cold), best of 3 passes; one decode step's GEMMs (30 layers + LM head); rows = "
        "`small_linear` (w row-major as the model holds it), panel = `panel_linear` (its panel-packed copy)",
        "",
        "| M | BLAS (ms) | rows (ms) | panel (ms) | panel vs BLAS | panel vs rows | GB/s per shape, rows | GB/s per shape, panel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, total, gbs in rows:
        spread = {k: f"{min(v):.1f}-{max(v):.1f}" for k, v in gbs.items()}
        rows_ms = f"{total['rows'] * 1e3:.1f}" if "rows" in total else "-"
        rows_vs = f"{total['rows'] / total['panel']:.2f}x" if "rows" in total else "-"
        lines.append(
            f"| {m} | {total['blas'] * 1e3:.1f} | {rows_ms} | {total['panel'] * 1e3:.1f} | "
            f"{total['blas'] / total['panel']:.2f}x | {rows_vs} | {spread.get('rows', '-')} | {spread['panel']} |"
        )
    publish(lines, None if args.no_write else RESULTS)


if __name__ == "__main__":
    main()
