"""SmolLM2 under TSP (tensor + sequence parallel) on 2 and 4 gloo ranks vs one process, and memory vs TP.

1. Greedy tokens: one process vs TSP at degrees 2 and 4 on 5 ShareGPT prompts, asserted identical on
   every rank; decode tok/s and per-rank weight / KV-cache bytes. (SmolLM2's 9 query / 3 KV heads do
   not divide 2 or 4, which plain TP refuses; TSP's shards need not hold whole heads.)
2. Memory at long prompts (``--seq`` tokens, default 2048 and 4096): per-rank weights, KV cache for
   that length, and the peak bytes of the tensors an eager prefill creates (``LiveBytes``), for one
   process, TP at degree 3 (the only TP degree SmolLM2 allows) and TSP at degrees 2, 3 and 4, with
   TSP's peak over TP's per length and what was alive at the peak (printed; the largest in the table).
   Prefill is measured as the runtime runs it: last-token logits only; no KV cache is written.

Appends a table to bench/RESULTS.md.

    python bench/tsp_generate.py
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

import zycompile
from zycompile.bench.machine import cpu_model
from zycompile.bench.report import publish
from zycompile.data import sample_sharegpt
from zycompile.models import load_model
from zycompile.parallel import distributed
from zycompile.parallel.local_group import LocalGroup
from zycompile.parallel.memory import LiveBytes, model_tensors, rank_memory
from zycompile.recipe import ParallelSection
from zycompile.runtime.kv_cache import StaticKVCache
from zycompile.runtime.sharded_kv_cache import SeqShardedKVCache

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SOURCE = "smollm2-135m-instruct"
BASE = ["lowering.backend=aot_eager", "runtime.max_seq_len=512", "runtime.threads=1"]


def generate(recipe: str, overrides: list[str], prompts: list[list[int]], new_tokens: int):
    torch._dynamo.reset()
    opt = zycompile.optimize(None, recipe, overrides=overrides)
    opt.generate(prompts[:1], max_new_tokens=2, ignore_eos=True)  # compile prefill + decode
    tokens, decode_s, steps = [], 0.0, 0
    for p in prompts:
        out = opt.generate([p], max_new_tokens=new_tokens, ignore_eos=True)
        tokens.append(out.tokens[0])
        decode_s, steps = decode_s + out.decode_s, steps + out.decode_steps
    return tokens, steps / decode_s, rank_memory(opt.model, opt.generator().cache)


def memory(mode: str, degree: int, seq: int) -> dict[str, int]:
    """Weights, KV cache for ``seq`` tokens and peak prefill activation bytes on this rank (eager)."""
    torch.set_num_threads(1)
    hf = load_model(SOURCE).model
    ids = torch.randint(0, hf.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    cfg = hf.config
    if mode == "tsp":
        from zycompile.parallel.tsp import apply_tsp

        distributed.setup(ParallelSection(mode="tsp", degree=degree))
        model = apply_tsp(hf, degree)
        del hf
        cache = SeqShardedKVCache.for_model(cfg, 1, seq, torch.float32, rank=model.ring.rank, world=degree)
        pos = torch.arange(seq)[None]
        run = lambda: model.step(ids, pos, torch.tensor([seq - 1]), None)  # noqa: E731
    else:
        model = hf
        if mode == "tp":
            from zycompile.parallel.tp import apply_tp

            distributed.setup(ParallelSection(mode="tp", degree=degree))
            apply_tp(model, degree)
        cache = StaticKVCache.for_model(cfg, 1, seq, torch.float32, head_shards=degree)
        run = lambda: model.lm_head(  # noqa: E731  (the runtime's split head: last token only)
            model.model(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
        )
    with torch.no_grad(), LiveBytes(keep=[*model_tensors(model), ids]) as live:
        run()
    mem = rank_memory(model, cache)
    return {**mem, "act_peak": live.peak, "act_peak_compute": live.peak_compute, "top": live.top(8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument(
        "--seq", type=int, nargs="+", default=[2048, 4096], help="prompt lengths of the memory comparison"
    )
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    opt = zycompile.optimize(None, "smollm2-135m", overrides=BASE)
    reqs = sample_sharegpt(opt.tokenizer, args.prompts, seed=1, max_prompt_len=200)
    prompts = [opt.generator().encode(r.prompt)[0] for r in reqs]
    del opt
    want, base_tps, base_mem = generate("smollm2-135m", BASE, prompts, args.new_tokens)
    print(f"1 process: {base_tps:.1f} tok/s; {base_mem}")
    gen_rows = [("1 process", base_tps, base_mem)]
    mem_rows = {seq: [("1 process", memory("none", 1, seq))] for seq in args.seq}
    for d in (2, 3, 4):
        with LocalGroup(d, threads=1, timeout_s=900) as group:
            if d != 3:
                tsp = [*BASE, "parallel.mode=tsp", f"parallel.degree={d}"]
                results = group.run(generate, "smollm2-135m-tsp", tsp, prompts, args.new_tokens)
                for rank, (tokens, _, _) in enumerate(results):
                    assert tokens == want, f"TSP {d} ranks, rank {rank}: tokens differ from one process"
                print(f"TSP {d} ranks: identical tokens on every rank; {results[0][1]:.1f} tok/s")
                gen_rows.append((f"TSP, {d} ranks (rank 0)", results[0][1], results[0][2]))
            for seq in args.seq:
                if d == 3:
                    mem_rows[seq].append(
                        (f"TP, {d} ranks (max over ranks)", _max(group.run(memory, "tp", d, seq)))
                    )
                mem_rows[seq].append(
                    (f"TSP, {d} ranks (max over ranks)", _max(group.run(memory, "tsp", d, seq)))
                )
    for seq, rows in mem_rows.items():
        for name, m in rows:
            print(
                f"{seq} tokens, {name}: peak activations {m['act_peak'] / 2**20:.1f} MiB; alive at the peak:"
            )
            for nbytes, what in m["top"]:
                print(f"    {nbytes / 2**20:6.2f} MiB  {what}")
    publish(_lines(args, prompts, gen_rows, mem_rows), None if args.no_append else RESULTS)


def _max(per_rank: list[dict]) -> dict:
    """Each number's maximum over the ranks; ``top``: what was alive at the highest rank's peak."""
    out = {k: max(m[k] for m in per_rank) for k in per_rank[0] if k != "top"}
    return {**out, "top": max(per_rank, key=lambda m: m["act_peak"])["top"]}


def _top(m: dict, n: int = 5) -> str:
    return ", ".join(f"{what.split(' ', 1)[1]} {nbytes / 2**20:.1f}" for nbytes, what in m["top"][:n])


def _lines(args, prompts, gen_rows, mem_rows) -> list[str]:
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    lines = [
        "",
        f"## SmolLM2 under TSP (tensor + sequence parallel) — {datetime.date.today()}",
        "",
        f"`python bench/tsp_generate.py` — {cpu_model()}, torch {torch.__version__}, gloo, 1 thread per rank "
        f"(ranks share 2 cores), aot_eager, fp32; {len(prompts)} ShareGPT prompts x {args.new_tokens} greedy "
        "tokens. **Greedy tokens identical to one process on every rank at TSP degrees 2 and 4 (asserted)** "
        "— degrees plain TP refuses for SmolLM2 (9 query / 3 KV heads): TSP shards rows, not heads.",
        "",
        "| run | decode tok/s | weights MiB per rank | weights / one process | KV cache MiB per rank |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {tps:.1f} | {mib(m['weights'])} | {m['weights'] / gen_rows[0][2]['weights']:.3f} "
            f"| {mib(m['kv_cache'])} |"
            for name, tps, m in gen_rows
        ],
        "",
        "Per-rank memory for one prompt (eager prefill, last-token logits). Peak activations: the most bytes "
        "of tensors created by the forward alive at once (a dispatch-mode tracker; weights, cache and inputs "
        "excluded; kernel workspaces invisible). 'without collective outputs' leaves out what collectives "
        "return (TSP: received weight shards, gathered K/V; TP's all-reduced sums happen inside DTensor and "
        "count as compute). 'x D / one process': the peak times the degree over one process's peak (1.00 "
        "would be a perfect 1/D split).",
    ]
    for seq, rows in mem_rows.items():
        base = rows[0][1]
        tp = next(m for name, m in rows if name.startswith("TP"))
        degree = lambda name: int(name.split(", ")[1].split()[0]) if "," in name else 1  # noqa: E731
        lines += [
            "",
            f"{seq}-token prompt:",
            "",
            "| run | weights MiB | KV cache MiB | peak activations MiB | without collective outputs MiB "
            "| peak activations / TP's (3 ranks) | x D / one process |",
            "|---|---|---|---|---|---|---|",
            *[
                f"| {name} | {mib(m['weights'])} | {mib(m['kv_cache'])} | {mib(m['act_peak'])} "
                f"| {mib(m['act_peak_compute'])} | {m['act_peak'] / tp['act_peak']:.2f} "
                f"| {m['act_peak'] * degree(name) / base['act_peak']:.2f} |"
                for name, m in rows
            ],
        ]
    seqs = list(mem_rows)
    ratio = {
        (seq, name.split(" (")[0]): m["act_peak"] / next(t for n, t in rows if n.startswith("TP"))["act_peak"]
        for seq, rows in mem_rows.items()
        for name, m in rows
        if name.startswith("TSP")
    }
    longest = mem_rows[seqs[-1]]
    lines += [
        "",
        "TSP's peak activations per rank / TP's at 3 ranks, by prompt length:",
        "",
        "| run | " + " | ".join(f"{s} tokens" for s in seqs) + " |",
        "|---|" + "---|" * len(seqs),
        *[
            f"| {run} | " + " | ".join(f"{ratio[s, run]:.2f}" for s in seqs) + " |"
            for run in dict.fromkeys(r for _, r in ratio)
        ],
        "",
        f"Alive at the peak, {seqs[-1]} tokens (largest, MiB): "
        + "; ".join(f"{name.split(' (')[0]}: {_top(m)}" for name, m in longest if "3 ranks" in name)
        + ".",
    ]
    return lines


if __name__ == "__main__":
    main()
