"""GEMM tuning on this machine: per-shape tuned vs default, and end-to-end decode with and without the database.

1. The tuning database for the recipe (``--db PATH``; tuned now with ``zycompile tune``'s code if the
   file does not exist).
2. Every tuned shape re-timed, default vs the database's winner, in a fresh measurement (rotating
   buffers, interleaved rounds, best round median; ``zycompile/tuning/bench.py``): the table, the
   geometric-mean speedup and the slowest ratio. Shapes where the default was kept run the same code
   both ways and count as 1.00x.
3. The recipe compiled twice, without ``tuned_gemm`` and with it reading that database (the recipe's own
   ``tuned_gemm`` entry, e.g. ``min_m``, kept), in one process:
   decode tok/s at batch 1 (greedy, 64 new tokens, median of interleaved repeats), decode ms/step per
   batch bucket and TTFT of one prompt.

    python bench/gemm_tuning.py --db /tmp/smollm2-tuning.yaml
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import zycompile
from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish
from zycompile.data import sample_sharegpt
from zycompile.tuning import db as tdb
from zycompile.tuning.bench import ROUNDS, BenchConfig, time_candidates
from zycompile.tuning.candidates import CANDIDATES, DEFAULT
from zycompile.tuning.tune import geomean, progress_bar, tune

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def with_tuned(recipe, db_path: str):
    """The recipe's own ``tuned_gemm`` (position and options kept) reading ``db_path``; appended if absent."""
    data = recipe.to_dict()
    spec = next((p for p in data["passes"] if p["name"] == "tuned_gemm"), None)
    if spec is None:
        data["passes"].append({"name": "tuned_gemm", "db": db_path})
    else:
        spec["db"] = db_path
    return zycompile.load_recipe(data)


def without_tuned(recipe):
    """The baseline: the same recipe with no ``tuned_gemm`` (every GEMM left to the other passes)."""
    data = recipe.to_dict()
    data["passes"] = [p for p in data["passes"] if p["name"] != "tuned_gemm"]
    return zycompile.load_recipe(data)


def retime(db: tdb.TuningDB, cfg: BenchConfig) -> list[tuple]:
    rows = []
    for shape, entry in sorted(db.entries.items()):
        if entry.winner == DEFAULT or entry.winner not in CANDIDATES:
            rows.append((shape, entry.times_ms.get(DEFAULT), DEFAULT, 1.0))
            continue
        t = time_candidates(shape, [CANDIDATES[DEFAULT], CANDIDATES[entry.winner]], cfg)
        rows.append((shape, t[0].ms, entry.winner, t[0].ms / t[1].ms))
        print(
            f"{shape.label():45s} default {t[0].ms:8.3f} ms  {entry.winner:14s} {t[0].ms / t[1].ms:5.2f}x",
            flush=True,
        )
    return rows


def decode_steps(gen, batches, context: int, reps: int = 10) -> dict[int, float]:
    out = {}
    for b in batches:
        ids = torch.zeros(b, 1, dtype=torch.long)
        pos = torch.full((b, 1), context)
        last = torch.zeros(b, dtype=torch.long)
        for _ in range(3):
            gen.step(ids, pos, last)
        t0 = time.perf_counter()
        for _ in range(reps):
            gen.step(ids, pos, last)
        out[b] = (time.perf_counter() - t0) / reps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2-135m")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--db", default=None, help="tuning database (default: tune now into a temp file)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--device", default="cpu", help="cuda: tune and run on the GPU (Triton sweep vs aten)")
    args = ap.parse_args()
    if args.device != "cpu":
        torch.set_default_device(args.device)  # the model (and the KV cache) load there
    recipe = zycompile.load_recipe(args.recipe, args.overrides)
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
    print(machine_line(), flush=True)

    if args.db is None:
        args.db = str(Path(tempfile.mkdtemp(prefix="zy-tuning-")) / "db.yaml")
    tuned_now = not Path(args.db).exists()
    t0 = time.perf_counter()
    if tuned_now:
        tune(recipe, args.db, progress=progress_bar(), log=lambda m: print(m, file=sys.stderr))
    tune_s = time.perf_counter() - t0
    db = tdb.load_checked(args.db)
    rows = retime(db, BenchConfig())
    ratios = [r[3] for r in rows]

    base = zycompile.optimize(None, without_tuned(recipe))
    tuned = zycompile.optimize(None, with_tuned(recipe, args.db))
    gens = {"default": base.generator(), "tuned": tuned.generator()}
    if base.tokenizer is not None:
        req = sample_sharegpt(base.tokenizer, 1, seed=0, max_prompt_len=200)[0]
        prompt = gens["default"].encode(req.prompt)[0]
    else:  # a random tiny config (e.g. the 1B-class GPU check): token ids stand in for a prompt
        prompt = list(range(1, 150))
    rates: dict[str, list[float]] = {k: [] for k in gens}
    ttft: dict[str, list[float]] = {k: [] for k in gens}
    steps: dict[str, list[dict]] = {k: [] for k in gens}
    for g in gens.values():  # compile every graph before timing
        g.generate([prompt], max_new_tokens=2, ignore_eos=True)
        decode_steps(g, recipe.runtime.batch_buckets, len(prompt), reps=1)
    for _ in range(args.repeats):  # interleaved: default, tuned, default, ...
        for name, g in gens.items():
            out = g.generate([prompt], max_new_tokens=args.new_tokens, ignore_eos=True)
            rates[name].append(out.decode_tok_s)
            ttft[name].append(out.ttft_s)
            steps[name].append(decode_steps(g, recipe.runtime.batch_buckets, len(prompt)))
    rate = {k: statistics.median(v) for k, v in rates.items()}
    first = {k: statistics.median(v) * 1e3 for k, v in ttft.items()}
    step = {
        k: {b: statistics.median(s[b] for s in v) * 1e3 for b in recipe.runtime.batch_buckets}
        for k, v in steps.items()
    }
    report = tuned.compile_report()
    notes = [n for r in report.passes if r.name == "tuned_gemm" for n in r.notes[:3]]

    lines = [
        f"\n## GEMM tuning — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python bench/gemm_tuning.py {' '.join(sys.argv[1:])}` — {machine_line()}; recipe "
        f"`{recipe.source_file}` hash {recipe.compute_hash()}; database {len(db.entries)} shapes "
        f"({'tuned in this run, ' + f'{tune_s:.0f} s' if tuned_now else 'tuned earlier by zycompile tune'}), "
        f"margin {db.margin}; validators {db.validators}",
        "",
        "Per shape, default vs the database's winner, re-timed after tuning (rotating buffers over 64 MiB,",
        "best of 3 round medians; M=1 GEMMs that decompose_mm_pass turns into reductions are not tuned). "
        f"{ROUNDS['quiet']} of {ROUNDS['all']} timing rounds started with no other process runnable "
        "(each waits up to 1 s for that).",
        "",
        "| M x N x K (fp32; row-major weight unless marked) | default (ms) | winner | speedup |",
        "|---|---|---|---|",
    ]
    for s, d, w, r in rows:
        tags = (" +bias" if s.bias else "") + (" K-major" if s.layout == "kmajor" else "")
        lines.append(f"| {s.m} x {s.n} x {s.k}{tags} | {d:.3f} | {w} | {r:.2f}x |")
    dec = [r[3] for r in rows if r[0].m <= 8]
    pre = [r[3] for r in rows if r[0].m > 8]
    lines += [
        "",
        f"geometric-mean speedup {geomean(ratios):.2f}x over {len(ratios)} shapes (decode M<=8: "
        f"{geomean(dec):.2f}x, prefill M>8: {geomean(pre):.2f}x); slowest shape {min(ratios):.2f}x",
        "",
        f"End to end, same process, {args.repeats} interleaved repeats (medians); tuned_gemm notes: "
        + "; ".join(notes),
        "",
        "| | decode tok/s (batch 1) | TTFT (ms, "
        + f"{len(prompt)}-token prompt) | "
        + " | ".join(f"ms/step batch {b}" for b in recipe.runtime.batch_buckets)
        + " |",
        "|---|---|---|" + "---|" * len(recipe.runtime.batch_buckets),
    ]
    for name in gens:
        lines.append(
            f"| {name} | {rate[name]:.1f} | {first[name]:.0f} | "
            + " | ".join(f"{step[name][b]:.1f}" for b in recipe.runtime.batch_buckets)
            + " |"
        )
    lines.append(
        f"| tuned / default | {rate['tuned'] / rate['default']:.2f}x | "
        f"{first['default'] / first['tuned']:.2f}x | "
        + " | ".join(f"{step['default'][b] / step['tuned'][b]:.2f}x" for b in recipe.runtime.batch_buckets)
        + " |"
    )
    publish(lines, None if args.no_write else RESULTS)


if __name__ == "__main__":
    main()
