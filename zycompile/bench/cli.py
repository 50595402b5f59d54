"""``zycompile bench``: serving metrics of the recipe's model vs HF eager and HF static + torch.compile."""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

DEFAULT_PRICES = Path(__file__).with_name("prices.yaml")
SYSTEMS = ("hf-eager", "hf-static-compile", "zycompile")


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="serving benchmark: TTFT, per-request and aggregate tok/s vs HF baselines",
        description=__doc__,
    )
    p.add_argument(
        "--recipe", default="smollm2-135m", help="recipe path or shipped name (default: smollm2-135m)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--dataset", choices=["sharegpt", "random"], default="sharegpt")
    p.add_argument("--num-prompts", type=int, default=8, help="requests per concurrency level (default 8)")
    p.add_argument("--input-len", type=int, default=None, help="random dataset: prompt tokens")
    p.add_argument(
        "--prefix-len",
        type=int,
        default=0,
        help="random dataset: one fixed random prefix of this many tokens before every prompt (a shared "
        "system prompt; vLLM's --random-prefix-len)",
    )
    p.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="output tokens for every request (default: ShareGPT reply length, capped)",
    )
    p.add_argument(
        "--max-output-len", type=int, default=64, help="cap on ShareGPT reply lengths (default 64)"
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        nargs="+",
        default=[1, 4],
        metavar="C",
        help="one or more (default: 1 4)",
    )
    p.add_argument("--arrival", choices=["burst", "interval", "poisson"], default="burst")
    p.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s for interval/poisson arrivals"
    )
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="bench/out", help="where results.json, report.md and plots go")
    p.add_argument("--prices", default=str(DEFAULT_PRICES), help="YAML of machine prices in $/hour (inputs)")
    p.add_argument("--price-key", default="cpu-2vcpu", help="which entry of --prices to use")
    p.add_argument(
        "--append-results", default=None, metavar="FILE", help="also append the Markdown report to FILE"
    )
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import yaml
    from tqdm import tqdm

    import zycompile
    from zycompile.bench import baselines, metrics, report, serve
    from zycompile.bench.machine import machine_line
    from zycompile.bench.workload import build_workload
    from zycompile.errors import ZyError
    from zycompile.models import load_model
    from zycompile.ops import cpu_kernels
    from zycompile.runtime.metrics import (
        kv_bytes_per_token,
        measure_matmul_peak,
        measure_read_bandwidth,
        prefill_flops,
        weight_bytes_per_token,
    )

    cs = sorted(set(args.max_concurrency))
    if cs[0] < 1:
        raise ZyError(f"--max-concurrency: got {cs[0]}; expected integers >= 1")
    if args.prices and not Path(args.prices).is_file():
        raise ZyError(f"--prices {args.prices}: file not found (a YAML mapping of machine name to $/hour)")
    prices = yaml.safe_load(Path(args.prices).read_text()) if args.prices else {}
    price = (prices or {}).get(args.price_key)

    recipe = zycompile.load_recipe(args.recipe, args.overrides)
    if cs[-1] > recipe.runtime.batch_buckets[-1]:
        raise ZyError(
            f"--max-concurrency {cs[-1]} exceeds the recipe's largest batch bucket "
            f"({recipe.runtime.batch_buckets[-1]}); raise runtime.batch_buckets"
        )
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun every rank serves; rank 0 reports
    log = lambda msg: main_rank and print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    systems = [s for s in SYSTEMS if s in args.systems]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and systems != ["zycompile"]:
        log("launched on several ranks: benchmarking zycompile only (HF baselines run in one process)")
        systems = ["zycompile"]
    log(f"loading {recipe.model.source} ({recipe.model.dtype})")
    opt = zycompile.optimize(None, recipe)
    gen = opt.generator()
    gen.on_compile = lambda m: log(m)
    tok = opt.tokenizer
    if tok is None and args.dataset != "random":
        raise ZyError(
            f"{recipe.model.source} has no tokenizer: use --dataset random --input-len N --output-len M"
        )
    try:
        items = _workload(args, recipe, tok, opt, gen, build_workload)
    except ValueError as e:
        raise ZyError(f"workload: {e}") from None
    max_len = max(len(it.prompt_ids) + it.output_len for it in items)
    bandwidth = measure_read_bandwidth(gen.device.type)
    wbytes = weight_bytes_per_token(opt.model)
    ctx = sum(len(it.prompt_ids) + it.output_len / 2 for it in items) / len(items)
    kv = kv_bytes_per_token(opt.model.config, ctx, gen.dtype)
    # Prefill MFU at c=1 (TTFT is then prefill alone): a whole-model count, so one process only.
    peak = (
        measure_matmul_peak(gen.device.type, gen.dtype)
        if int(os.environ.get("WORLD_SIZE", "1")) == 1
        else None
    )
    flops = functools.cache(lambda n, cached: prefill_flops(opt.model, n, cached))
    machine = machine_line()
    log(machine)

    results: dict[str, dict[int, dict[str, float]]] = {}
    timings: dict[str, dict[int, list]] = {}
    hf_model = None
    for system in systems:
        if system == "zycompile":
            log("compiling zycompile graphs (prefill buckets, decode batch buckets) ...")
            t0 = time.perf_counter()
            serve.warmup(gen, cs[-1])
            log(f"compiled in {time.perf_counter() - t0:.0f}s")
            graphs_before = len(opt.compile_report().graphs)
            runner = lambda c: serve.serve(gen, items, c)[0]  # noqa: E731
        else:
            if hf_model is None:  # a pristine copy: zycompile re-laid its own model's weights
                hf_model = load_model(recipe.model.source, recipe.model.dtype).model
            pad = (
                0
                if tok is None
                else tok.pad_token_id
                if tok.pad_token_id is not None
                else (tok.eos_token_id or 0)
            )
            hf = baselines.HFRunner(hf_model, pad, static=system == "hf-static-compile", max_len=max_len)
            for c in cs:
                log(f"{system}: warm-up at batch {c}" + (" (torch.compile)" if hf.static else ""))
                hf.warmup(c)
            runner = lambda c, hf=hf: hf.serve(items, c)  # noqa: E731
        results[system], timings[system] = {}, {}
        spec = gen.speculator if system == "zycompile" else None
        for c in tqdm(cs, desc=system, unit="c", file=sys.stderr, disable=not main_rank):
            before = type(spec.stats)(**vars(spec.stats)) if spec else None
            t = runner(c)
            m = metrics.summarize(t)
            if spec:  # acceptance rate, mean accepted drafts per verify, tokens per target forward
                m.update({f"spec_{k}": v for k, v in spec.stats.since(before).as_dict().items()})
            m["tokens_per_dollar"] = metrics.tokens_per_dollar(m["output_throughput"], price)
            results[system][c], timings[system][c] = m, t
        if system == "zycompile" and len(opt.compile_report().graphs) != graphs_before:
            log("warning: zycompile compiled during the timed run (a shape was not warmed up)")

    if not main_rank:
        return 0
    # The ceilings MBU and MFU divide by: the better of before and after the runs. One measurement on
    # a shared host can land in a slow spell (a 102 GFLOP/s "peak" gave prefill MFUs of 113-150%).
    bandwidth = max(bandwidth, measure_read_bandwidth.__wrapped__(gen.device.type))
    if peak:
        peak = max(peak, measure_matmul_peak.__wrapped__(gen.device.type, gen.dtype))
    # zycompile's decode GEMMs may stream coded copies of the weights (panel_codes.h): its bytes are those
    streamed = (
        weight_bytes_per_token(opt.model, cpu_kernels.coded_bytes) if cpu_kernels.codes_in_use() else wbytes
    )
    for system, by_c in results.items():
        for c, m in by_c.items():
            m["mbu"] = (
                ((streamed if system == "zycompile" else wbytes) + c * kv)
                * (m["output_throughput"] / c)
                / bandwidth
            )
            if c == 1 and peak:
                m["prefill_mfu"] = metrics.prefill_mfu(timings[system][c], flops, peak)

    header = (
        f"## zycompile bench — {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        f"`zycompile bench {' '.join(sys.argv[2:])}` — {machine}; recipe `{recipe.source_file}` "
        f"(hash {recipe.compute_hash()}); {len(items)} {args.dataset} prompts "
        f"(mean prompt {sum(len(i.prompt_ids) for i in items) / len(items):.0f} tokens, mean output "
        f"{sum(i.output_len for i in items) / len(items):.0f}), arrivals {args.arrival}; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s, {gen.dtype} matmul peak "
        f"{(peak or float('nan')) / 1e9:.0f} GFLOP/s (each the better of before and after the runs); price {args.price_key}={price} $/h"
        + _prefix_note(results.get("zycompile", {}))
    )
    md = report.markdown(results, cs, header)
    payload = {
        "machine": machine,
        "recipe": recipe.to_dict(),
        "recipe_hash": recipe.compute_hash(),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "bandwidth_bytes_s": bandwidth,
        "matmul_peak_flop_s": peak,
        "results": results,
        "requests": {
            s: {
                c: [
                    {"arrival": r.arrival, "token_times": r.token_times, "prompt_len": r.prompt_len}
                    for r in t
                ]
                for c, t in by_c.items()
            }
            for s, by_c in timings.items()
        },
    }
    files = report.write_outputs(Path(args.output_dir), payload, md, timings)
    print()
    print(report.table(results, cs))
    print()
    log("wrote " + ", ".join(str(f) for f in files))
    if args.append_results:
        with open(args.append_results, "a") as f:
            f.write("\n" + md)
        log(f"appended to {args.append_results}")
    return 0


def _workload(args, recipe, tok, opt, gen, build_workload):
    return build_workload(
        tok if tok is not None else opt.model.config.vocab_size,
        lambda text: gen.encode(text)[0],
        num_prompts=args.num_prompts,
        seed=args.seed,
        dataset=args.dataset,
        input_len=args.input_len,
        prefix_len=args.prefix_len,
        output_len=args.output_len,
        max_output_len=args.max_output_len,
        max_prompt_len=min(1024, recipe.runtime.max_seq_len - args.max_output_len),
        arrival=args.arrival,
        rate=args.request_rate,
    )


def _prefix_note(runs: dict) -> str:
    """'; zycompile's prefix cache served N of M prompt tokens at c=...' when it served any."""
    hits = [
        f"{m['prefix_cached_tokens']:,} of {m['input_tokens']:,} prompt tokens at c={c}"
        for c, m in runs.items()
        if m.get("prefix_cached_tokens")
    ]
    return f"; zycompile's prefix cache served {', '.join(hits)}" if hits else ""
