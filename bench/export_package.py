"""Export SmolLM2 as an AOTInductor package; load it in a fresh process; same greedy tokens; build time and size.

Builds the package from the default recipe (decode graph per batch bucket, one dynamic prefill
graph), then a separate Python process that imports no transformers model code loads it and
generates greedily on 5 ShareGPT prompts; asserts the tokens equal the optimized model's and
reports decode tok/s of both, measured in this one run (the live model in this process, the package
in the fresh one, same prompts). The package's graphs carry the recipe's passes; the table lists
what each pass matched per graph, from the manifest. Appends a table to bench/RESULTS.md.

    python bench/export_package.py                          # batch buckets [1, 2, 4, 8]
    python bench/export_package.py --set runtime.batch_buckets=[1] --no-append
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zycompile
from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish
from zycompile.data import sample_sharegpt

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
FRESH = """
import json, re, sys, time
import zycompile
t0 = time.perf_counter()
m = zycompile.load(sys.argv[1])
load_s = time.perf_counter() - t0
prompts = json.loads(sys.argv[2])
m.generate(prompts[:1], max_new_tokens=2, ignore_eos=True)
toks, dec_s, steps = [], 0.0, 0
for p in prompts:
    out = m.generate([p], max_new_tokens=int(sys.argv[3]), ignore_eos=True)
    toks.append(out.tokens[0]); dec_s += out.decode_s; steps += out.decode_steps
print(json.dumps({"tokens": toks, "tok_s": steps / dec_s, "load_s": load_s,
                  "modeling": sorted(x for x in sys.modules if re.match(r"transformers\\.models\\.(?!auto\\.)\\w+\\.modeling_", x))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="package directory (default: a temporary one)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    opt = zycompile.optimize(None, "smollm2-135m", overrides=args.overrides)
    gen = opt.generator()
    reqs = sample_sharegpt(opt.tokenizer, args.prompts, seed=2, max_prompt_len=200)
    prompts = [gen.encode(r.prompt)[0] for r in reqs]
    opt.generate(prompts[:1], max_new_tokens=2, ignore_eos=True)  # compile the live model first
    want, dec_s, steps = [], 0.0, 0
    for p in prompts:
        out = opt.generate([p], max_new_tokens=args.new_tokens, ignore_eos=True)
        want.append(out.tokens[0])
        dec_s, steps = dec_s + out.decode_s, steps + out.decode_steps
    live_tps = steps / dec_s
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="zy-pkg-"))
    t0 = time.perf_counter()
    manifest = json.loads(
        opt.export(out_dir, progress=lambda m: print(f"[export] {m}", flush=True)).read_text()
    )
    build_s = time.perf_counter() - t0
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(out_dir), json.dumps(prompts), str(args.new_tokens)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"loading the package failed:\n{proc.stderr[-3000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tokens"] == want, "the package's greedy tokens differ from the optimized model's"
    assert got["modeling"] == [], f"the loader imported model code: {got['modeling']}"
    sizes = manifest["bytes"]
    graphs = sum(sizes[g["file"]] for g in manifest["graphs"].values())
    per_graph = ", ".join(f"{k} {v['compile_s']}" for k, v in manifest["graphs"].items())
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    lines = [
        "",
        f"## Export package (AOTInductor) — {datetime.date.today()}",
        "",
        f"`python bench/export_package.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
        + f" — {machine_line()}; "
        f"SmolLM2 fp32, {len(manifest['graphs'])} graphs ({', '.join(manifest['graphs'])}). **The package, "
        f"loaded in a fresh process without transformers' model code, generates the same greedy tokens as "
        f"the optimized model on {len(prompts)} ShareGPT prompts x {args.new_tokens} tokens (asserted).**",
        "",
        "| build s | AOTI compile s per graph | weights MiB | graphs MiB (all) | package MiB | load s | "
        "decode tok/s package | decode tok/s live (torch.compile) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {build_s:.0f} | {per_graph} "
        f"| {mib(sizes['weights.safetensors'])} | {mib(graphs)} | {mib(sum(sizes.values()))} "
        f"| {got['load_s']:.1f} | {got['tok_s']:.1f} | {live_tps:.1f} |",
    ]
    per_pass: dict[str, list[str]] = {}
    for r in manifest["passes"]:
        per_pass.setdefault(r["name"], []).append(str(r["matches"]))
    done = "; ".join(f"{name} {'/'.join(n)}" for name, n in per_pass.items()) or "none"
    lines += ["", f"Passes in the package, matches per graph ({'/'.join(manifest['graphs'])}): {done}."]
    if manifest["pass_warnings"]:
        lines += ["", "Export fallbacks: " + "; ".join(manifest["pass_warnings"])]
    publish(lines, None if args.no_append else RESULTS)


if __name__ == "__main__":
    main()
