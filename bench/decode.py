"""Decode benchmark (c=1): HF eager generate vs HF static cache + torch.compile vs zycompile.

One process, same prompts, medians over repeats; MBU against the read bandwidth measured in the
same run; cold and warm compile times of zycompile (warm: a new process on the cold run's caches).
Appends a dated table to bench/RESULTS.md.

    python bench/decode.py                      # SmolLM2 fp32, 5 ShareGPT prompts, 64 new tokens
    python bench/decode.py --set runtime.max_seq_len=1024 --repeats 5
    python bench/decode.py --set model.dtype=bfloat16  # the same in bf16 (HF loads bf16 too)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import zycompile
from zycompile.bench.baselines import stock_static_kwargs
from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish
from zycompile.data import sample_sharegpt
from zycompile.models import load_model
from zycompile.runtime.metrics import (
    kv_bytes_per_token,
    mbu,
    measure_read_bandwidth,
    weight_bytes_per_token,
)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def hf_run(model, ids, new_tokens, static: bool) -> tuple[float, float]:
    """(ttft_s, decode tok/s) for one HF generate; decode rate from a 1-token run subtracted."""
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    if static:
        kw.update(stock_static_kwargs())
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, **{**kw, "min_new_tokens": 1, "max_new_tokens": 1})
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        total = time.perf_counter() - t0
    return ttft, (new_tokens - 1) / max(total - ttft, 1e-9)


WARM = """
import json, sys, time
t0 = time.perf_counter()
import zycompile
recipe = zycompile.load_recipe(sys.argv[1], json.loads(sys.argv[2]))
gen = zycompile.optimize(None, recipe).generator()
t1 = time.perf_counter()
gen.generate([json.loads(sys.argv[3])], max_new_tokens=2, ignore_eos=True)
t2 = time.perf_counter()
rate = max(gen.generate([json.loads(sys.argv[3])], max_new_tokens=64, ignore_eos=True).decode_tok_s for _ in range(3))
print("WARM " + json.dumps(
    {"compile_s": t2 - t1, "ready_s": t2 - t0, "loaded": getattr(gen.compiled_step, "loaded", 0), "tok_s": rate}
))
"""


def warm_start(args, ids: list[int]) -> dict:
    """Compile time (the first 2-token generate) in a new process sharing this run's cache dirs."""
    cmd = [
        sys.executable,
        "-c",
        WARM,
        args.recipe,
        json.dumps(args.overrides),
        json.dumps(ids),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"warm-start process failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("WARM "))
    return json.loads(line[5:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2-135m")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true", help="zycompile only")
    ap.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()

    # Cold compile: a fresh Inductor cache dir, so nothing is reused from earlier runs. Assigned, not
    # setdefault: importing zycompile (torch._inductor) already set it to the shared default dir, and
    # "cold" then timed that dir's hits from earlier runs.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="zy-inductor-")
    os.environ["ZYCOMPILE_STEP_CACHE"] = tempfile.mkdtemp(prefix="zy-steps-")  # no saved steps either
    recipe = zycompile.load_recipe(args.recipe, args.overrides)
    opt = zycompile.optimize(None, recipe)
    model, tok = opt.model, opt.tokenizer
    gen = opt.generator()
    reqs = sample_sharegpt(tok, args.prompts, seed=0, max_prompt_len=recipe.runtime.prefill_buckets[-1])
    prompts = [gen.encode(r.prompt)[0] for r in reqs]
    bw = measure_read_bandwidth("cpu")
    bws = [bw]
    wbytes = weight_bytes_per_token(model)
    print(machine_line())
    print(f"read bandwidth {bw / 1e9:.1f} GB/s; weights read per token {wbytes / 1e6:.0f} MB")

    counters = torch._dynamo.utils.counters  # read at each use: compiles may replace the inner Counter

    def fx_cache() -> str:
        fx = counters["inductor"]
        return f"{fx['fxgraph_cache_miss']} misses, {fx['fxgraph_cache_hit']} hits"

    t0 = time.perf_counter()
    gen.generate([prompts[0]], max_new_tokens=2, ignore_eos=True)
    cold = time.perf_counter() - t0
    cold_cache = fx_cache()
    warm = warm_start(args, prompts[0])  # a new process on the caches the cold compile filled
    print(f"zycompile compile: cold {cold:.1f}s; warm {warm['compile_s']:.1f}s (saved steps, new process)")

    def zy(ids):
        out = gen.generate([ids], max_new_tokens=args.new_tokens, ignore_eos=True)
        return out.ttft_s, out.decode_tok_s

    systems = {"zycompile": zy}
    if not args.skip_hf:
        # A pristine copy for the baselines: zycompile re-laid its own model's weights.
        hf_model = load_model(recipe.model.source, recipe.model.dtype).model
        systems["HF eager"] = lambda ids: hf_run(hf_model, torch.tensor([ids]), args.new_tokens, static=False)
        systems["HF static+compile"] = lambda ids: hf_run(
            hf_model, torch.tensor([ids]), args.new_tokens, static=True
        )
    rows = {}
    for name, fn in systems.items():
        fn(prompts[0])  # warm-up (and compile, for the stock path)
        ttfts, rates = [], []
        for _ in range(args.repeats):
            for ids in prompts:
                t, r = fn(ids)
                ttfts.append(t)
                rates.append(r)
        ctx = statistics.mean(len(p) for p in prompts) + args.new_tokens / 2
        per_step = wbytes + kv_bytes_per_token(model.config, ctx, gen.dtype)
        rate = statistics.median(rates)
        bws.append(measure_read_bandwidth("cpu"))  # the host's free bandwidth drifts: re-measure
        rows[name] = (statistics.median(ttfts), rate, per_step)
        print(f"{name:20s} TTFT {rows[name][0] * 1e3:7.1f} ms  decode {rate:6.1f} tok/s")
    rows = {name: (t, r, mbu(step, r, max(bws))) for name, (t, r, step) in rows.items()}

    base = rows.get("HF static+compile")
    lines = [
        f"\n## decode c=1 — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python bench/decode.py {' '.join(sys.argv[1:])}` — {machine_line()}",
        f"recipe `{recipe.source_file}` hash {recipe.compute_hash()}; {len(prompts)} ShareGPT prompts × "
        f"{args.repeats} repeats, {args.new_tokens} new tokens, {recipe.model.dtype}; read bandwidth "
        f"{min(bws) / 1e9:.1f}-{max(bws) / 1e9:.1f} GB/s (measured before and after each system; MBU "
        "against the highest); "
        f"zycompile compile (first 2-token generate): cold {cold:.1f} s (fresh Inductor cache and step cache; "
        f"FX graph cache {cold_cache}); warm, new process: {warm['compile_s']:.1f} s with the saved steps "
        f"({warm['loaded']} loaded; process start to first tokens {warm['ready_s']:.1f} s; the loaded steps "
        f"decode at {warm['tok_s']:.1f} tok/s, best of 3, first prompt)",
        "",
        "| system | TTFT median (ms) | decode tok/s (median) | MBU | vs HF static+compile |",
        "|---|---|---|---|---|",
    ]
    for name, (t, r, m) in rows.items():
        ratio = f"{r / base[1]:.2f}x" if base else "n/a"
        lines.append(f"| {name} | {t * 1e3:.0f} | {r:.1f} | {m:.0%} | {ratio} |")
    publish(lines, None if args.no_write else RESULTS)


if __name__ == "__main__":
    main()
