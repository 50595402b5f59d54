"""Coded weight copies (csrc/panel_codes.h) against fp32 copies: decode steps and prefill chunks.

The recipe's compiled steps run with ``panel_linear`` keeping fp32 panel copies, then coded copies of
the same weights (where their values are GGUF block codes: the embedded SmolLM2's all are), alternated
call by call in one process so a slow spell of the shared host hits both. Asserts that both give the
same logits, bit for bit, and appends the table to bench/RESULTS.md.

    python bench/weight_codes.py [--recipe R] [--set KEY=VALUE ...] [--context 250] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import zycompile
from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish
from zycompile.ops import cpu_kernels

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2-135m")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--context", type=int, default=250, help="decode position (tokens of context)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if cpu_kernels.build() is not None:
        sys.exit(f"the C++ kernels are unavailable here: {cpu_kernels.build()}")
    switch = torch.ops.zycompile_cpu.panel_codes.default
    opt = zycompile.optimize(None, args.recipe, overrides=args.overrides)
    gen = opt.generator()
    buckets = opt.recipe.runtime.batch_buckets
    for r in range(max(buckets)):  # every row holds `context` tokens of K/V
        gen.prefill_chunk([[5 + r] * args.context], [args.context], 0, args.context, torch.tensor([r]))

    def decode(b):
        ids, pos = torch.full((b, 1), 7), torch.full((b, 1), args.context)
        return lambda: gen.step(ids, pos, torch.zeros(b, dtype=torch.long))

    def prefill(n):
        return lambda: gen.prefill_chunk([[9] * n], [n], 0, n, torch.tensor([0]))

    cases = {f"decode, batch {b}": decode(b) for b in buckets}
    cases.update({f"prefill, {n} tokens": prefill(n) for n in (64, 256)})
    times = {(name, coded): [] for name in cases for coded in (False, True)}
    for name, fn in cases.items():
        first = {}
        for coded in (False, True):
            switch(coded)
            first[coded] = fn().clone()  # the first call makes the copies
            fn()
        assert torch.equal(first[False], first[True]), f"{name}: coded copies changed the logits"
    print(f"coded copies: {torch.ops.zycompile_cpu.panel_cache_coded.default()}", flush=True)
    for _ in range(args.repeats):
        for name, fn in cases.items():
            for coded in (False, True):
                switch(coded)
                t0 = time.perf_counter()
                fn()
                times[name, coded].append(time.perf_counter() - t0)
    switch(True)
    lines = [
        f"\n## coded weight copies vs fp32 copies — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python bench/weight_codes.py {' '.join(sys.argv[1:])}` — {machine_line()}; recipe "
        f"`{opt.recipe.source_file}` hash {opt.recipe.compute_hash()}; decode at {args.context} tokens of "
        f"context; median of {args.repeats} calls, the two alternated; logits identical (asserted)",
        "",
        "| step | fp32 copies (ms) | coded copies (ms) | speed-up |",
        "|---|---|---|---|",
    ]
    for name in cases:
        a, b = (statistics.median(times[name, c]) * 1e3 for c in (False, True))
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
        print(lines[-1], flush=True)
    publish(lines, None if args.no_write else RESULTS)


if __name__ == "__main__":
    main()
