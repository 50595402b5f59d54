"""A small random Qwen3-MoE under TP and TSP on 2 gloo ranks vs one process: identical greedy tokens,
experts split whole across the ranks (1/D of the expert bytes each), decode tok/s.

No MoE checkpoint is bundled, so the model is ``tiny:qwen3_moe`` scaled up (random weights, fixed
seed): 16 experts of 256 (top-2) in each of 4 layers, hidden 512. Rows: one process; TP with
``fuse_projections`` (q/k/v and gate/up fused per shard) and without it; TSP. Asserts token-for-token
equality on every rank; reports per-rank weight and expert bytes. Appends a table to bench/RESULTS.md.

    python bench/moe_generate.py
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from pathlib import Path

import torch

import zycompile
from zycompile.bench.machine import cpu_model
from zycompile.bench.report import publish
from zycompile.parallel.local_group import LocalGroup
from zycompile.parallel.memory import rank_memory
from zycompile.parallel.tp import local_bytes

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SOURCE = (
    "tiny:qwen3_moe?hidden_size=512&num_attention_heads=8&num_key_value_heads=4"
    "&num_hidden_layers=4&num_experts=16&moe_intermediate_size=256&vocab_size=8192"
)


def recipe(mode: str, degree: int, fuse: bool) -> dict:
    return {
        "model": {"source": SOURCE},
        "parallel": {"mode": mode, "degree": degree},
        "passes": ["canonicalize_attention", *(["fuse_projections"] if fuse else [])],
        "lowering": {"backend": "aot_eager"},
        "runtime": {"max_seq_len": 128, "batch_buckets": [1], "prefill_buckets": [64], "threads": 1},
    }


def run(mode: str, degree: int, fuse: bool, prompts: list[list[int]], new_tokens: int):
    torch._dynamo.reset()
    opt = zycompile.optimize(SOURCE, recipe(mode, degree, fuse))
    opt.generate(prompts[:1], max_new_tokens=2, ignore_eos=True)  # compile prefill + decode
    tokens, decode_s, steps = [], 0.0, 0
    for p in prompts:
        out = opt.generate([p], max_new_tokens=new_tokens, ignore_eos=True)
        tokens.append(out.tokens[0])
        decode_s, steps = decode_s + out.decode_s, steps + out.decode_steps
    experts = sum(
        local_bytes(p)
        for name, p in opt.model.named_parameters()
        if "experts" in name or "w_gate_up" in name  # HF / TP names, TSP's
    )
    fused = sum(r.matches for r in opt.compile_report().passes if r.name == "fuse_projections")
    return tokens, steps / decode_s, rank_memory(opt.model)["weights"], experts, fused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="sharded runs, interleaved; median tok/s")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(16, 64, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(0, 8192, (n,), generator=g).tolist() for n in lens]
    want, *base = run("none", 1, True, prompts, args.new_tokens)
    rows = [("1 process", base[0], [base[0]], *base[1:])]
    configs = [
        ("TP, 2 ranks, fuse_projections per shard", "tp", True),
        ("TP, 2 ranks, no fusion", "tp", False),
        ("TSP, 2 ranks (fuse_projections skipped: packed per shard)", "tsp", True),
    ]
    seen: dict[str, list] = {name: [] for name, _, _ in configs}
    with LocalGroup(2, threads=1, timeout_s=600) as group:
        for _ in range(args.rounds):  # interleaved: slow drift of the shared machine hits every config
            for name, mode, fuse in configs:
                results = group.run(run, mode, 2, fuse, prompts, args.new_tokens)
                for rank, (tokens, *_) in enumerate(results):
                    assert tokens == want, f"{name} rank {rank}: tokens differ from one process"
                seen[name].append(results[0][1:])
                print(f"{name}: identical tokens on both ranks; {results[0][1]:.1f} tok/s")
    for name, runs in seen.items():
        speeds = [r[0] for r in runs]
        rows.append((name, statistics.median(speeds), speeds, *runs[0][1:]))
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    one = rows[0]
    lines = [
        "",
        f"## Qwen3-MoE (random, 16 experts top-2) under TP and TSP — {datetime.date.today()}",
        "",
        f"`python bench/moe_generate.py` — {cpu_model()}, torch {torch.__version__}, gloo, 1 thread per rank "
        f"(ranks share 2 cores), aot_eager, fp32; `{SOURCE}`; {len(prompts)} random prompts of {min(lens)}-"
        f"{max(lens)} tokens x {args.new_tokens} greedy tokens. **Greedy tokens identical to one process on "
        "both ranks in every row (asserted).** Experts are split whole (expert parallel, router replicated); "
        f"'fused groups' is fuse_projections' matches summed over the compiled graphs. Sharded rows: median "
        f"of {args.rounds} interleaved runs (all runs listed).",
        "",
        "| run | decode tok/s | runs | vs 1 process | weights MiB per rank | expert MiB per rank "
        "| experts / one process | fused groups |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {name} | {tps:.1f} | {' / '.join(f'{s:.1f}' for s in runs)} | {tps / one[1]:.2f}x | {mib(w)} "
            f"| {mib(e)} | {e / one[4]:.3f} | {f} |"
            for name, tps, runs, w, e, f in rows
        ],
    ]
    publish(lines, None if args.no_append else RESULTS)


if __name__ == "__main__":
    main()
