"""Sequential vs overlapped all-gather+GEMM and GEMM+reduce-scatter on gloo ranks (CPU processes).

Shapes of a TP+SP layer of a 1B-class model (hidden 2048, MLP 5632) at a long prefill: X rows are
the sequence. Median over calls, slowest rank. The honest result on this 2-core machine: ranks share
the cores, so a GEMM and a transfer compete for the same CPU rather than running side by side.

    python bench/overlap.py
    python bench/overlap.py --world 2 --tokens 2048 --no-append
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from zycompile.bench.machine import cpu_model
from zycompile.bench.report import publish
from zycompile.ops.overlap import all_gather_matmul, matmul_reduce_scatter
from zycompile.parallel.local_group import LocalGroup

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def rank_bench(kind: str, overlap: bool, tokens: int, hidden: int, inner: int, iters: int) -> float:
    world = dist.get_world_size()
    if kind == "ag+gemm":  # sequence-sharded input, column-sharded weight
        x, w = torch.randn(tokens // world, hidden), torch.randn(hidden, inner // world)
        fn = lambda: all_gather_matmul(x, w, overlap=overlap)  # noqa: E731
    else:  # K-sharded input, row-sharded weight, output scattered over the sequence
        x, w = torch.randn(tokens, inner // world), torch.randn(inner // world, hidden)
        fn = lambda: matmul_reduce_scatter(x, w, overlap=overlap)  # noqa: E731
    times = []
    for i in range(iters + 2):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inner", type=int, default=5632)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    rows = []
    for world in args.world:
        with LocalGroup(world, threads=1, timeout_s=600) as group:
            for kind in ("ag+gemm", "gemm+rs"):
                t = {
                    ov: group.run(rank_bench, kind, ov, args.tokens, args.hidden, args.inner, args.iters)[0]
                    for ov in (False, True)
                }
                rows.append((world, kind, t[False], t[True]))
                print(
                    f"W={world} {kind}: sequential {t[False] * 1e3:.1f} ms, overlapped {t[True] * 1e3:.1f} ms"
                )
    lines = [
        "",
        f"## Communication/computation overlap — {datetime.date.today()}",
        "",
        f"`python bench/overlap.py` — {cpu_model()}, torch {torch.__version__}, gloo over loopback, one process "
        f"per rank with 1 thread; {args.tokens} tokens, hidden {args.hidden}, MLP {args.inner}, fp32; median of "
        f"{args.iters} calls, slowest rank. Sequential GEMM+RS is matmul + all-reduce + slice (gloo has no "
        "reduce-scatter).",
        "",
        "| ranks | pattern | sequential ms | overlapped (ring, per-rank chunks) ms | speedup |",
        "|---|---|---|---|---|",
        *[f"| {w} | {k} | {s * 1e3:.1f} | {o * 1e3:.1f} | {s / o:.2f}x |" for w, k, s, o in rows],
    ]
    publish(lines, None if args.no_append else RESULTS)


if __name__ == "__main__":
    main()
