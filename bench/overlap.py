"""Sequential vs overlapped all-gather+GEMM and GEMM+reduce-scatter on gloo ranks (CPU processes).

Shapes of a TP+SP layer of a 1B-class model (hidden 2048, MLP 5632) at a long prefill: X rows are
the sequence. Median over calls, slowest rank. The honest result on this 2-core machine: ranks share
the cores, so a GEMM and a transfer compete for the same CPU rather than running side by side.

The end-to-end rows (``--parts e2e``) time one prefill of a small Llama under TP with sequence
parallelism, compiled with the ``overlap_comm`` pass off and on (aot_eager: the same GEMM kernels
either way, so the difference is the decomposition), same ranks, same inputs.

    python bench/overlap.py
    python bench/overlap.py --world 2 --tokens 2048 --no-append
    python bench/overlap.py --parts e2e --world 2 4
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


E2E_MODEL = (
    "tiny:llama?hidden_size=1024&intermediate_size=2816&num_hidden_layers=4&num_attention_heads=16"
    "&num_key_value_heads=4&head_dim=64&vocab_size=2048"
)


def rank_e2e(variant: str, tokens: int, iters: int) -> tuple[float, int]:
    """Median prefill seconds (slowest rank) and overlap_comm's rewrites in the prefill graph.
    ``variant``: 'tp' (plain, all-reduces), 'sp' (sequence parallel), 'sp+overlap' (and overlap_comm)."""
    import zycompile

    torch._dynamo.reset()
    world = dist.get_world_size()
    recipe = {
        "model": {"source": E2E_MODEL},
        "parallel": {"mode": "tp", "degree": world, "sequence_parallel": variant != "tp"},
        "passes": ["canonicalize_attention", *(["overlap_comm"] if variant == "sp+overlap" else [])],
        "lowering": {"backend": "aot_eager"},
        "runtime": {"max_seq_len": tokens + 8, "batch_buckets": [1], "prefill_buckets": [tokens]},
    }
    torch.manual_seed(0)
    gen = zycompile.optimize(E2E_MODEL, recipe).generator()
    prompt = torch.randint(0, 2048, (tokens,)).tolist()
    times = []
    for i in range(iters + 2):
        dist.barrier()
        t0 = time.perf_counter()
        gen.prefill([prompt], [tokens])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    fused = sum(r.matches for r in gen.opt.compile_report().passes if r.name == "overlap_comm")
    return float(t), fused


def e2e_rows(args) -> list[str]:
    rows = []
    for world in args.world:
        with LocalGroup(world, threads=1, timeout_s=600) as group:
            (tp, _), (off, _), (on, fused) = (
                group.run(rank_e2e, v, args.e2e_tokens, args.iters)[0] for v in ("tp", "sp", "sp+overlap")
            )
        rows.append(
            f"| {world} | {args.e2e_tokens} | {tp * 1e3:.1f} | {off * 1e3:.1f} | {on * 1e3:.1f} | {fused} "
            f"| {off / on:.2f}x |"
        )
        print(rows[-1])
    return [
        "",
        f"### End to end: TP + sequence parallelism prefill, overlap_comm off vs on — {datetime.date.today()}",
        "",
        f"`python bench/overlap.py --parts e2e` — {cpu_model()}, torch {torch.__version__}, gloo over loopback, "
        f"one process per rank with 1 thread; `{E2E_MODEL}` (4 layers, hidden 1024, MLP 2816), fp32, batch 1, "
        f"aot_eager; one prefill of {args.e2e_tokens} tokens; median of {args.iters}, slowest rank.",
        "",
        "| ranks | tokens | plain TP ms | TP+SP ms | TP+SP + overlap_comm ms | ops fused | overlap_comm speedup |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inner", type=int, default=5632)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--parts", nargs="+", choices=["ops", "e2e"], default=["ops", "e2e"])
    ap.add_argument("--e2e-tokens", type=int, default=1024)
    args = ap.parse_args()
    if "ops" in args.parts:
        ops_rows(args)
    if "e2e" in args.parts:
        publish(e2e_rows(args), None if args.no_append else RESULTS)


def ops_rows(args) -> None:
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
        f"{args.iters} calls, slowest rank. Sequential GEMM+RS is matmul + gloo reduce-scatter.",
        "",
        "| ranks | pattern | sequential ms | overlapped (ring, per-rank chunks) ms | speedup |",
        "|---|---|---|---|---|",
        *[f"| {w} | {k} | {s * 1e3:.1f} | {o * 1e3:.1f} | {s / o:.2f}x |" for w, k, s, o in rows],
    ]
    publish(lines, None if args.no_append else RESULTS)


if __name__ == "__main__":
    main()
