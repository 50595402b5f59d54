"""Decode step time per batch bucket: how much batching buys on this machine.

A memory-bound decoder reads its weights once per step whatever the batch, so tokens/s should grow
almost linearly with the batch until compute binds. This measures the compiled decode step of the
recipe at each batch bucket (best of 3 × 10 steps) and appends the table to bench/RESULTS.md.

    python bench/decode_batch.py [--recipe R] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import zycompile
from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2-135m")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--context", type=int, default=150, help="decode position (tokens of context)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    opt = zycompile.optimize(None, args.recipe, overrides=args.overrides)
    gen = opt.generator()
    rows = []
    for b in opt.recipe.runtime.batch_buckets:
        ids = torch.zeros(b, 1, dtype=torch.long)
        pos = torch.full((b, 1), args.context)
        last = torch.zeros(b, dtype=torch.long)
        for _ in range(3):  # compile + warm
            gen.step(ids, pos, last)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(10):
                gen.step(ids, pos, last)
            best = min(best, (time.perf_counter() - t0) / 10)
        rows.append((b, best))
        print(f"batch {b}: {best * 1e3:.1f} ms/step, {b / best:.1f} tok/s", flush=True)
    base = rows[0][1]
    lines = [
        f"\n## decode step per batch bucket — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python bench/decode_batch.py {' '.join(sys.argv[1:])}` — {machine_line()}; recipe "
        f"`{opt.recipe.source_file}` hash {opt.recipe.compute_hash()}; context {args.context} tokens; best of 3 × 10 steps",
        "",
        "| batch | ms / step | tokens/s | tokens/s vs batch 1 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {b} | {t * 1e3:.1f} | {b / t:.1f} | {(b / t) / (1 / base):.2f}x |" for b, t in rows]
    publish(lines, None if args.no_write else RESULTS)


if __name__ == "__main__":
    main()
