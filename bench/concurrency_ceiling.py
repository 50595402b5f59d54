"""The most aggregate tok/s at concurrency c can gain over c=1 for a workload on this machine.

At c=1 a request costs its prefill (compute-bound) and one batch-1 decode step per output token
(bandwidth-bound). At c, a decode step serves up to c rows, but every prompt token still costs its
prefill. With prefill and decode taking turns, as the engine runs them:

    T1 = P + N * t1            Tc >= P + ceil(N / c) * tc

P: the workload's prefill, timed here as the engine runs it at c=1 (each prompt to its first token,
prefix cache on); N: its output tokens; t1 / tc: the compiled batch-1 / batch-c decode steps with
every row at the workload's token-weighted mean context (medians of 40 steps, the two batches taking
turns). ``sequential`` is T1 / Tc: every step full, no drain, no prefill chunk slowing a decode step.
Only running prefill FLOPs while a decode step streams weights can beat it; ``overlap`` bounds that
too: Tc is never under the workload's FLOPs at the measured matmul peak, nor under ceil(N / c) weight
reads at the measured read bandwidth. Appends the table to bench/RESULTS.md.

    python bench/concurrency_ceiling.py [--num-prompts 64] [--max-output-len 256] [--c 8]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import zycompile
from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish
from zycompile.bench.workload import build_workload
from zycompile.runtime.engine import Engine
from zycompile.runtime.metrics import (
    kv_bytes_per_token,
    measure_matmul_peak,
    measure_read_bandwidth,
    prefill_flops,
    weight_bytes_per_token,
)
from zycompile.runtime.sampling import SamplingParams

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def step_seconds(gen, batches: tuple[int, ...], context: int, steps: int = 40) -> list[float]:
    """Median seconds of the compiled decode step at each batch, every row at ``context``. The batches
    take turns step by step, so a slow spell of this shared host hits them alike."""
    inputs = [
        (torch.zeros(b, 1, dtype=torch.long), torch.full((b, 1), context), torch.zeros(b, dtype=torch.long))
        for b in batches
    ]
    for args in inputs * 3:  # compile + warm
        gen.step(*args)
    times: list[list[float]] = [[] for _ in batches]
    for _ in range(steps):
        for args, ts in zip(inputs, times):
            t0 = time.perf_counter()
            gen.step(*args)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def prefill_seconds(gen, prompts: list[list[int]]) -> tuple[float, list[int]]:
    """Wall time of the engine taking every prompt to its first token at c=1; each prompt's tokens that
    came from the prefix cache."""
    engine = Engine(gen, max_concurrency=1)
    first = SamplingParams(max_new_tokens=1, ignore_eos=True)
    engine.add_request(prompts[0][:16], first)  # compile the prefill graph off the clock
    engine.run()
    engine = Engine(gen, max_concurrency=1)  # a fresh prefix cache, as the benchmark's c=1 run has
    for p in prompts:
        engine.add_request(p, first)
    t0 = time.perf_counter()
    done = engine.run()
    return time.perf_counter() - t0, [r.cached for r in done]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2-135m")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-output-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--c", type=int, default=8, help="the concurrency to bound (a batch bucket)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    opt = zycompile.optimize(None, args.recipe, overrides=args.overrides)
    gen = opt.generator()
    if args.c not in gen.batch_buckets:
        sys.exit(f"--c {args.c}: expected one of the recipe's batch buckets {gen.batch_buckets}")
    items = build_workload(
        opt.tokenizer,
        lambda text: gen.encode(text)[0],
        num_prompts=args.num_prompts,
        seed=args.seed,
        dataset="sharegpt",
        input_len=None,
        output_len=None,
        max_output_len=args.max_output_len,
        max_prompt_len=min(1024, gen.max_seq_len - args.max_output_len),
        arrival="burst",
        rate=None,
    )
    prompts = [list(it.prompt_ids) for it in items]
    outs = [it.output_len for it in items]
    n_out = sum(outs)
    # prefill yields each request's first token; decode step j = 1..n-1 sees the prompt and j outputs
    n_dec = n_out - len(outs)
    context = round(sum((len(p) + n / 2) * (n - 1) for p, n in zip(prompts, outs)) / max(n_dec, 1))
    print(
        f"{len(prompts)} prompts, {sum(map(len, prompts)):,} prompt and {n_out:,} output tokens; "
        f"mean decode context {context}",
        flush=True,
    )

    prefill, cached = prefill_seconds(gen, prompts)
    computed = sum(map(len, prompts)) - sum(cached)
    t1, tc = step_seconds(gen, (1, args.c), context)
    print(
        f"prefill {prefill:.1f} s; decode step batch 1 {t1 * 1e3:.1f} ms, batch {args.c} {tc * 1e3:.1f} ms",
        flush=True,
    )
    steps = math.ceil(n_dec / args.c)
    seq_1, seq_c = prefill + n_dec * t1, prefill + steps * tc

    model = opt.model
    peak, bw = measure_matmul_peak("cpu", gen.dtype), measure_read_bandwidth("cpu")
    # a decode token is a one-token prefill after `context` cached ones (attention is linear in context)
    flops = sum(prefill_flops(model, len(p), k) for p, k in zip(prompts, cached)) + n_dec * prefill_flops(
        model, context + 1, context
    )
    weights = weight_bytes_per_token(model)
    kv = kv_bytes_per_token(model.config, context, gen.cache.keys[0].dtype)
    floor_c = max(flops / peak, steps * (weights + args.c * kv) / bw)

    lines = [
        f"\n## concurrency ceiling c={args.c} / c=1 — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python bench/concurrency_ceiling.py {' '.join(sys.argv[1:])}` — {machine_line()}; recipe "
        f"`{opt.recipe.source_file}` hash {opt.recipe.compute_hash()}; {len(prompts)} ShareGPT prompts "
        f"(seed {args.seed}, replies capped at {args.max_output_len}): {sum(map(len, prompts)):,} prompt tokens "
        f"({computed:,} computed, the rest from the prefix cache), {n_out:,} output tokens, mean decode "
        f"context {context}, decode steps the median of 40 taking turns; matmul peak {peak / 1e9:.0f} GFLOP/s, read bandwidth {bw / 1e9:.1f} GB/s",
        "",
        f"| model | prefill P (s) | t1 (ms) | t{args.c} (ms) | T1 (s) | T{args.c} (s) | ceiling c={args.c} / c=1 |",
        "|---|---|---|---|---|---|---|",
        f"| sequential: measured prefill + full batch-{args.c} steps, no drain | {prefill:.1f} | {t1 * 1e3:.1f} | "
        f"{tc * 1e3:.1f} | {seq_1:.1f} | {seq_c:.1f} | {seq_1 / seq_c:.2f}x |",
        f"| overlap: T{args.c} >= max(all FLOPs at peak, {steps:,} weight reads at bandwidth) | | {t1 * 1e3:.1f} | | "
        f"{seq_1:.1f} | {floor_c:.1f} | {seq_1 / floor_c:.2f}x |",
    ]
    publish(lines, None if args.no_write else RESULTS)


if __name__ == "__main__":
    main()
