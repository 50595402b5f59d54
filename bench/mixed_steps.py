"""Engine at concurrency 8 with and without mixed steps (runtime.mixed_prefill_tokens): wall time,
aggregate tok/s, TTFT, and how many requests got the same greedy tokens as without.

A 1B-class bf16 random Llama on the GPU (where a batch-8 decode step leaves the FMA units idle while
it streams weights, the case mixed steps are for); synthetic prompts of 64-512 tokens, all sent at
once. On the 2-core EPYC, SmolLM2 fp32 lost 30% with mixed steps (RESULTS.md, notes of 2026-11-29
16:4x-17:4x).
Appends a table to bench/RESULTS.md with the card's name. Greedy tokens are compared, not asserted: a
GPU GEMM may pick another kernel for M = 8 + chunk rows than for 8, and a random model's near-tied
logits then flip (on CPU the kernels give each row the same bits at any M; the engine tests assert it).

    python bench/mixed_steps.py                                  # on a lent GPU
    python bench/mixed_steps.py --device cpu --small --no-append  # smoke run of the script on CPU
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from graphs_gpu import ONE_B, SMALL  # the same 1B-class and smoke-test configs (bench/ is on sys.path)

import zycompile
from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish
from zycompile.runtime.engine import Engine
from zycompile.runtime.sampling import SamplingParams

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def recipe(source: str, dtype: str, backend: str, mixed: int) -> dict:
    return {
        "model": {"source": source, "dtype": dtype},
        "passes": ["canonicalize_attention", "fuse_projections"],
        "lowering": {"backend": backend},
        "runtime": {
            "max_seq_len": 1024,
            "batch_buckets": [1, 2, 4, 8],
            "prefill_buckets": [256],
            "mixed_prefill_tokens": mixed,
        },
    }


def serve(
    gen, prompts: list[list[int]], new_tokens: int, device: str
) -> tuple[list[list[int]], float, list[float]]:
    engine = Engine(gen, max_concurrency=8)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, params, arrival=t0) for p in prompts]
    engine.run()
    wall = time.perf_counter() - t0
    return [r.output for r in reqs], wall, [r.ttft for r in reqs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a small config (smoke test of the script)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--chunks", type=int, nargs="+", default=[32, 128], help="mixed chunk widths to try")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    dev = args.device
    source = SMALL if args.small else ONE_B
    dtype = "bfloat16" if dev == "cuda" else "float32"
    backend = "inductor" if dev == "cuda" else "aot_eager"
    torch.set_default_device(dev)
    rng = random.Random(0)
    vocab = 512 if args.small else 32000  # the tiny configs' vocabulary, ONE_B's
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randrange(64, 513))] for _ in range(args.prompts)]
    rows, reference = [], None
    for mixed in [0, *args.chunks]:
        torch._dynamo.reset()
        gen = zycompile.optimize(recipe=recipe(source, dtype, backend, mixed)).generator()
        serve(gen, prompts[:8], 4, dev)  # compiles every graph the run meets
        gen.cache.reset()
        outputs, wall, ttfts = serve(gen, prompts, args.new_tokens, dev)
        if reference is None:
            reference = outputs
        same = sum(a == b for a, b in zip(outputs, reference))
        rows.append(
            (mixed, wall, args.prompts * args.new_tokens / wall, statistics.median(ttfts) * 1e3, same)
        )
        print(
            f"mixed_prefill_tokens={mixed}: {wall:.2f} s, {rows[-1][2]:.1f} tok/s, "
            f"TTFT median {rows[-1][3]:.0f} ms, {same}/{args.prompts} requests with the same tokens",
            flush=True,
        )
    lines = [
        f"\n## mixed steps at c=8 — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python bench/mixed_steps.py {' '.join(sys.argv[1:])}` — {machine_line()}; {source.split('?')[0]} "
        f"({'1B-class' if not args.small else 'small'}, {dtype}, {backend}); {args.prompts} random prompts of "
        f"64-512 tokens sent at once, {args.new_tokens} new tokens each, concurrency 8",
        "",
        "| mixed_prefill_tokens | wall (s) | aggregate tok/s | TTFT median (ms) | requests with the tokens of 0 |",
        "|---|---|---|---|---|",
        *[f"| {m} | {w:.2f} | {t:.1f} | {f:.0f} | {s}/{args.prompts} |" for m, w, t, f, s in rows],
    ]
    publish(lines, None if args.no_append else RESULTS)


if __name__ == "__main__":
    main()
