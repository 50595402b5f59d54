"""GPU: decode tok/s with CUDA/HIP graphs off vs on (runtime.graphs), 1B-class bf16 random Llama, batch 1 and 8.

Next to HF static cache + torch.compile in the same run; MBU against the read bandwidth measured on
the same card. Appends a table to bench/RESULTS.md with the card's name.

    python bench/graphs_gpu.py                       # on a lent GPU
    python bench/graphs_gpu.py --device cpu --small --no-append   # smoke run of the script on CPU
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

import zycompile
from zycompile.bench.baselines import stock_static_kwargs
from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish
from zycompile.runtime.metrics import kv_bytes_per_token, mbu, measure_read_bandwidth, weight_bytes_per_token

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ONE_B = "tiny:llama?hidden_size=2048&intermediate_size=5632&num_hidden_layers=22&num_attention_heads=32&num_key_value_heads=4&head_dim=64&vocab_size=32000"
SMALL = "tiny:llama?hidden_size=256&intermediate_size=512&num_hidden_layers=2"


def recipe(source: str, dtype: str, graphs: str, backend: str) -> dict:
    return {
        "model": {"source": source, "dtype": dtype},
        "passes": ["canonicalize_attention", "fuse_projections"],
        "lowering": {"backend": backend},
        "runtime": {"max_seq_len": 512, "batch_buckets": [1, 8], "prefill_buckets": [128], "graphs": graphs},
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a small config (smoke test of the script)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    dev = args.device
    source = SMALL if args.small else ONE_B
    dtype = "bfloat16" if dev == "cuda" else "float32"
    backend = "inductor" if dev == "cuda" else "aot_eager"
    torch.set_default_device(dev)
    bw = measure_read_bandwidth(dev)
    prompt = list(range(1, 129))
    rows = []
    for graphs in ("off", "on"):
        torch._dynamo.reset()
        opt = zycompile.optimize(source, recipe(source, dtype, graphs, backend))
        opt.model.to(dev)
        gen = opt.generator()
        wbytes = weight_bytes_per_token(opt.model)
        for batch in (1, 8):
            gen.generate([prompt] * batch, max_new_tokens=4, ignore_eos=True)  # compile + capture
            sync(dev)
            out = gen.generate([prompt] * batch, max_new_tokens=args.new_tokens, ignore_eos=True)
            tps = out.decode_tok_s * batch
            steps = out.decode_tok_s
            per_step = wbytes + batch * kv_bytes_per_token(
                opt.model.config, len(prompt) + args.new_tokens / 2, opt.model.dtype
            )
            rows.append((f"zycompile, graphs {graphs}", batch, tps, mbu(per_step, steps, bw)))
            print(rows[-1], flush=True)
    hf = opt.model  # HF's own generate on the same weights (its static cache + torch.compile)
    ids = torch.tensor([prompt], device=dev)
    kw = {"do_sample": False, **stock_static_kwargs()}
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        sync(dev)
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        sync(dev)
        t1 = time.perf_counter()
        hf.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        sync(dev)
        t2 = time.perf_counter()
    hf_steps = (args.new_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9)
    rows.append(
        (
            "HF static+compile",
            1,
            hf_steps,
            mbu(wbytes + kv_bytes_per_token(hf.config, 192, hf.dtype), hf_steps, bw),
        )
    )
    lines = [
        "",
        f"## Decode with CUDA/HIP graphs — {datetime.date.today()}",
        "",
        f"`python bench/graphs_gpu.py` — {machine_line()}; {'1B-class' if not args.small else 'small'} random "
        f"Llama ({dtype}), 128-token prompt, {args.new_tokens} new tokens; read bandwidth {bw / 1e9:.0f} GB/s.",
        "",
        "| system | batch | decode tok/s (all sequences) | MBU |",
        "|---|---|---|---|",
        *[f"| {s} | {b} | {t:.1f} | {m:.0%} |" for s, b, t, m in rows],
    ]
    publish(lines, None if args.no_append else RESULTS)


if __name__ == "__main__":
    main()
