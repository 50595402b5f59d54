"""GEMV weight layout: the decode step's linears at M=1, row-major vs K-major weights (weight_layout pass).

Runs SmolLM2-135M's shapes (30 layers of fused qkv, o, fused gate/up, down, plus the 49152-wide LM head)
back to back over distinct weights (538 MB, far beyond the caches), as one decode step reads them.
Best of 7; appends a table to bench/RESULTS.md.

    python bench/gemv_layout.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish
from zycompile.runtime.metrics import measure_read_bandwidth

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def best(fn, repeats: int = 7) -> float:
    fn()
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main() -> None:
    torch.manual_seed(0)
    row = [torch.randn(n, k) for n, k in SHAPES]
    kmaj = [w.t().contiguous().t() for w in row]  # what weight_layout does: same values, [K, N] storage
    xs = {k: torch.randn(1, k) for k in (576, 1536)}
    nbytes = sum(w.numel() * 4 for w in row)
    bw = measure_read_bandwidth("cpu")
    for a, b in zip(row, kmaj):
        x = xs[a.shape[1]]  # same values either layout; only the summation order may differ
        torch.testing.assert_close(F.linear(x, a), F.linear(x, b), rtol=1e-4, atol=1e-4)
    t_row = best(lambda: [F.linear(xs[w.shape[1]], w) for w in row])
    t_k = best(lambda: [F.linear(xs[w.shape[1]], w) for w in kmaj])
    head_row = best(lambda: F.linear(xs[576], row[-1]))
    head_k = best(lambda: F.linear(xs[576], kmaj[-1]))
    lines = [
        f"\n## GEMV weight layout — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python bench/gemv_layout.py` — {machine_line()}; {nbytes / 1e6:.0f} MB of SmolLM2 decode GEMVs "
        f"(M=1, fp32), best of 7; read bandwidth {bw / 1e9:.1f} GB/s",
        "",
        "| layout | all GEMVs (ms) | GB/s | LM head alone (ms) |",
        "|---|---|---|---|",
        f"| row-major [N, K] (HF default) | {t_row * 1e3:.1f} | {nbytes / t_row / 1e9:.1f} | {head_row * 1e3:.2f} |",
        f"| K-major (weight_layout) | {t_k * 1e3:.1f} | {nbytes / t_k / 1e9:.1f} | {head_k * 1e3:.2f} |",
        f"| speedup | {t_row / t_k:.2f}x | | {head_row / head_k:.2f}x |",
    ]
    publish(lines, None if "--no-write" in sys.argv else RESULTS)


if __name__ == "__main__":
    main()
