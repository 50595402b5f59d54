"""The C++ decode/verify attention kernel against SDPA (its fallback) on SmolLM2's attention shapes.

One decode step's attention: 30 layers, each with its own 2048-slot static cache (so no call finds its
keys in cache), 9 query heads over 3 KV heads, head dim 64, every row at the same context length. SDPA
runs as ``zycompile::attention`` runs it with the kernel off (``ZYCOMPILE_CPU_ATTENTION=sdpa``): the
keys past the longest row trimmed on the host, then one SDPA call. Time per step is the median of 8 interleaved
passes; GB/s counts the K/V bytes the visible keys hold. Appends the table to bench/RESULTS.md.

    python bench/decode_attention.py [--batch 1 8] [--context 150 350 1000] [--tq 1 2 4] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish
from zycompile.ops import cpu_decode_attention
from zycompile.ops.attention import attention, position_mask

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
LAYERS, HQ, HKV, D, SLOTS = 30, 9, 3, 64, 2048


def sdpa(q, k, v, mask, scale):
    """The ``zycompile::attention`` op with the kernel off, as ``ZYCOMPILE_CPU_ATTENTION=sdpa`` runs it."""
    cpu_decode_attention.ENABLED = False
    try:
        return attention(q, k, v, mask, scale, False)
    finally:
        cpu_decode_attention.ENABLED = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, nargs="+", default=[150, 350, 1000])
    ap.add_argument("--tq", type=int, nargs="+", default=[1], help="queries per row (a verify block: k + 1)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    kernel = cpu_decode_attention.load()
    if kernel is None:
        sys.exit("decode_attention: the C++ kernels could not be built")
    rows = []
    for tq in args.tq:
        for b in args.batch:
            caches = [(torch.randn(b, HKV, SLOTS, D), torch.randn(b, HKV, SLOTS, D)) for _ in range(LAYERS)]
            for ctx in args.context:
                q = torch.randn(b, HQ, tq, D)
                mask = position_mask(torch.arange(SLOTS), torch.full((b, 1), ctx - tq) + torch.arange(tq))
                k0, v0 = caches[0]
                torch.testing.assert_close(
                    kernel(q, k0, v0, mask, 0.125, False), sdpa(q, k0, v0, mask, 0.125)
                )
                times = {"sdpa": [], "kernel": []}
                for _ in range(8):
                    for name, fn in (("sdpa", sdpa), ("kernel", lambda *a: kernel(*a, False))):
                        t0 = time.perf_counter()
                        for k, v in caches:
                            fn(q, k, v, mask, 0.125)
                        times[name].append(time.perf_counter() - t0)
                t = {n: statistics.median(ts) for n, ts in times.items()}
                gb = b * HKV * ctx * 2 * D * 4 * LAYERS / 1e9
                rows.append((b, tq, ctx, t, gb))
                print(
                    f"batch {b} x {tq} queries, {ctx} keys: SDPA {t['sdpa'] * 1e3:.2f} ms, "
                    f"kernel {t['kernel'] * 1e3:.2f} ms",
                    flush=True,
                )
    lines = [
        f"\n## decode attention kernel vs SDPA, SmolLM2 shapes — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python bench/decode_attention.py {' '.join(sys.argv[1:])}` — {machine_line()}; fp32, 30 layers "
        f"x ({HQ} query / {HKV} KV heads, head dim {D}) over their own {SLOTS}-slot caches, median of 8 passes",
        "",
        "| batch | queries per row | keys | SDPA (ms) | kernel (ms) | kernel vs SDPA | kernel GB/s (visible K/V) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, tq, ctx, t, gb in rows:
        lines.append(
            f"| {b} | {tq} | {ctx} | {t['sdpa'] * 1e3:.2f} | {t['kernel'] * 1e3:.2f} | "
            f"{t['sdpa'] / t['kernel']:.2f}x | {gb / t['kernel']:.1f} |"
        )
    publish(lines, None if args.no_write else RESULTS)


if __name__ == "__main__":
    main()
