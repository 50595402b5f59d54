"""Prefill beside decode: does a prompt on one half of the cores slow the decode steps on the other?

Times the recipe's compiled batch-``--batch`` decode step and a ``--prompt``-token prefill (into one
cache row) alone at the full thread count, alone at the engine's split (runtime/prefill_worker.py),
and side by side on two Python threads at that split, then appends the table to bench/RESULTS.md.
The last line says whether ``runtime.prefill_overlap: true`` can pay on this machine: how much faster
side by side does the same work than one after the other on all threads, with both sides always busy
(the engine's runs also have stretches with only one side busy).

    python bench/prefill_overlap.py [--recipe R] [--batch 8] [--prompt 250] [--context 150] [--seconds 4]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

import zycompile
from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish
from zycompile.intraop import threads
from zycompile.runtime.prefill_worker import PrefillWorker, overlap_threads, warm

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _ms_per_call(fn, seconds: float) -> float:
    fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2-135m")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=250, help="prefill length (tokens)")
    ap.add_argument("--context", type=int, default=150, help="decode position (tokens of context)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    ap.add_argument(
        "--split",
        type=int,
        nargs=2,
        metavar=("DECODE", "PREFILL"),
        help="thread counts to try "
        "instead of the engine's split (the sum may exceed the cores: oversubscription)",
    )
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    opt = zycompile.optimize(None, args.recipe, overrides=[*args.overrides, "runtime.prefill_overlap=true"])
    gen = opt.generator()
    split = overlap_threads(gen)
    if split is None:
        sys.exit("prefill overlap does not apply (see runtime.prefill_overlap)")
    dthreads, pthreads = args.split or split
    warm(gen, args.batch)
    worker = PrefillWorker.of(gen, pthreads)
    b = args.batch
    ids, last = torch.zeros(b, 1, dtype=torch.long), torch.zeros(b, dtype=torch.long)
    pos = torch.full((b, 1), args.context)
    prompt = [(i * 7919) % 40000 + 100 for i in range(args.prompt)]  # any tokens: only time is read

    def decode():
        gen.step(ids, pos, last)

    def prefill():  # into the batch's last row, as the engine does beside the others
        worker.prefill(prompt, 0, b - 1)

    for _ in range(2):  # compile the full-width graphs too
        decode(), prefill()
    full = (_ms_per_call(decode, args.seconds), _ms_per_call(prefill, args.seconds))
    with threads(dthreads):
        dec_alone = _ms_per_call(decode, args.seconds)
    pre_alone = worker.pool.submit(_ms_per_call, prefill, args.seconds).result()
    together: dict[str, float] = {}

    def side(name, fn, n):
        with threads(n):
            together[name] = _ms_per_call(fn, 2 * args.seconds)

    t = threading.Thread(target=side, args=("prefill", prefill, pthreads))
    t.start()
    side("decode", decode, dthreads)
    t.join()
    # one after the other on all threads, per decode step: the step plus the share of a prefill that
    # ran beside it; side by side, that step took together["decode"]
    per_step = together["decode"] / together["prefill"]
    serial = full[0] + per_step * full[1]
    lines = [
        f"\n## prefill beside decode — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python bench/prefill_overlap.py {' '.join(sys.argv[1:])}` — {machine_line()}; recipe "
        f"`{opt.recipe.source_file}`; batch-{b} decode step at context {args.context}, {args.prompt}-token "
        f"prefill into one row; split {dthreads} decode + {pthreads} prefill thread(s)",
        "",
        "| | decode step (ms) | prefill (ms) |",
        "|---|---|---|",
        f"| alone, {torch.get_num_threads()} threads | {full[0]:.1f} | {full[1]:.1f} |",
        f"| alone, split ({dthreads} / {pthreads}) | {dec_alone:.1f} | {pre_alone:.1f} |",
        f"| side by side, split | {together['decode']:.1f} | {together['prefill']:.1f} |",
        "",
        f"Side by side, each decode step also moved {per_step:.3f} of a prefill along; one after the other "
        f"on all threads that work takes {serial:.1f} ms against {together['decode']:.1f} "
        f"({serial / together['decode']:.2f}x).",
    ]
    publish(lines, None if args.no_write else RESULTS)


if __name__ == "__main__":
    main()
