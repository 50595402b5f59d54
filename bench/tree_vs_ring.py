"""Decode attention over a sequence-sharded KV cache: tree vs ring vs unsharded, gloo ranks on this CPU.

One decode token (SmolLM2's geometry by default: 9 query heads, 3 KV heads, head dim 64, fp32)
attends over a context of N positions split round-robin over W ranks (W processes, 1 thread each).
Per (W, N): median latency of one attention call for tree (2 all-reduces, or 1 all-gather), ring (W-1 K/V rounds,
each overlapped with the partial over the block in hand) and one process over the whole context
(1 thread); communication rounds and bytes this rank sends per token per layer; tree/ring speedup.
Appends a dated table to bench/RESULTS.md.

    python bench/tree_vs_ring.py                         # W = 2, 4; N up to 64k
    python bench/tree_vs_ring.py --world 2 --contexts 4096 16384 --iters 10 --no-append
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
from zycompile.ops import comm_stats
from zycompile.ops.tree_attention import ring_attention, split_kv_attention, tree_attention
from zycompile.parallel.local_group import LocalGroup

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def inputs(ctx: int, world: int, rank: int, heads: int, kv_heads: int, dim: int):
    """The same q everywhere; this rank's round-robin share of the context's K/V (padded to equal size)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, 1, dim, generator=g)
    local = -(-ctx // world)
    g.manual_seed(1 + rank)
    k = torch.randn(1, kv_heads, local, dim, generator=g)
    v = torch.randn(1, kv_heads, local, dim, generator=g)
    mask = ((torch.arange(local) * world + rank) < ctx).view(1, 1, 1, local)
    return q, k, v, mask


def time_calls(fn, iters: int, warmup: int, barrier: bool) -> list[float]:
    times = []
    for i in range(warmup + iters):
        if barrier:
            dist.barrier()  # start every call together so a rank's time is the collective's time
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def rank_bench(impl: str, ctx: int, heads: int, kv_heads: int, dim: int, iters: int, warmup: int):
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, mask = inputs(ctx, world, rank, heads, kv_heads, dim)
    name, scale = dist.group.WORLD.group_name, dim**-0.5
    if impl.startswith("tree"):
        merge = "allgather" if impl == "tree-allgather" else "allreduce"
        call = lambda: tree_attention(q, k, v, mask, scale, name, 1, merge)  # noqa: E731
    else:
        call = lambda: ring_attention(q, k, v, mask, scale, name)  # noqa: E731
    with comm_stats.counting() as stats:
        call()
    times = time_calls(call, iters, warmup, barrier=True)
    # the slowest rank's median is the step's latency
    t = torch.tensor([statistics.median(times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t), stats


def unsharded(ctx: int, heads: int, kv_heads: int, dim: int, iters: int, warmup: int) -> float:
    q, k, v, mask = inputs(ctx, 1, 0, heads, kv_heads, dim)
    return statistics.median(
        time_calls(lambda: split_kv_attention(q, k, v, mask, dim**-0.5, False, 1), iters, warmup, False)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    geo = (args.heads, args.kv_heads, args.head_dim)
    base = {n: unsharded(n, *geo, args.iters, args.warmup) for n in args.contexts}
    rows = []
    for world in args.world:
        with LocalGroup(world, threads=1) as group:
            for n in args.contexts:
                res = {}
                for impl in ("tree", "tree-allgather", "ring"):
                    out = group.run(rank_bench, impl, n, *geo, args.iters, args.warmup)
                    res[impl] = out[0]
                rows.append((world, n, res))
                ms = {k: v[0] * 1e3 for k, v in res.items()}
                print(f"W={world} N={n}: " + ", ".join(f"{k} {t:.2f} ms" for k, t in ms.items()))
    lines = [
        "",
        f"## Tree vs ring decode attention — {datetime.date.today()}",
        "",
        f"`python bench/tree_vs_ring.py` — {cpu_model()}, torch {torch.__version__}, gloo over loopback, "
        f"one process per rank with 1 thread ({args.heads} q heads, {args.kv_heads} KV heads, head dim "
        f"{args.head_dim}, fp32, batch 1, one query token, KV round-robin over the ranks; median of "
        f"{args.iters} calls, slowest rank). Comm = what one rank sends per token per layer.",
        "",
        "| ranks | context | unsharded (1 proc) ms | tree (2 all-reduce) ms | tree (1 all-gather) ms | ring ms "
        "| ring / tree | ring / tree-allgather | tree comm | tree-allgather comm | ring comm |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for world, n, res in rows:
        (tt, ts), (gt, gs), (rt, rs) = res["tree"], res["tree-allgather"], res["ring"]
        lines.append(
            f"| {world} | {n:,} | {base[n] * 1e3:.2f} | {tt * 1e3:.2f} | {gt * 1e3:.2f} | {rt * 1e3:.2f} "
            f"| {rt / tt:.1f}x | {rt / gt:.1f}x | {_comm(ts)} | {_comm(gs)} | {_comm(rs)} |"
        )
    publish(lines, None if args.no_append else RESULTS)


def _comm(stats) -> str:
    """'2 all_reduce, 4.6 KB' — what this rank issued and sent for one call."""
    return "; ".join(
        f"{n} {k}, {_kb(stats['bytes'][k])}" for k, n in sorted(stats["calls"].items()) if k != "recv"
    )


def _kb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB" if n >= 1e3 else f"{n} B"


if __name__ == "__main__":
    main()
