"""GPU only: the Triton split-KV decode kernel vs SDPA at long context (bf16, batch 1 and 8, GQA).

Checks the kernel against SDPA's output first, then prints median latencies (CUDA events, after
warm-up) and the ratio; appends the table to bench/RESULTS.md with the card's name.

    python bench/split_kv_gpu.py                      # contexts 4k..128k, SmolLM2-like and 8B-like heads
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from zycompile.bench.report import publish
from zycompile.ops import triton_split_kv

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cuda_ms(fn, iters: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--splits", type=int, default=32)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    dev, dt = "cuda", torch.bfloat16
    rows = []
    for name, hq, hkv, d in [("9q/3kv x64", 9, 3, 64), ("32q/8kv x128", 32, 8, 128)]:
        for batch in (1, 8):
            for n in args.contexts:
                q = torch.randn(batch, hq, 1, d, device=dev, dtype=dt)
                k = torch.randn(batch, hkv, n, d, device=dev, dtype=dt)
                v = torch.randn(batch, hkv, n, d, device=dev, dtype=dt)
                out, _ = triton_split_kv.split_kv_attention(q, k, v, None, d**-0.5, args.splits)
                ref = F.scaled_dot_product_attention(q, k, v, scale=d**-0.5, enable_gqa=True)
                torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
                t_kernel = cuda_ms(
                    lambda q=q, k=k, v=v, d=d: triton_split_kv.split_kv_attention(
                        q, k, v, None, d**-0.5, args.splits
                    )
                )
                t_sdpa = cuda_ms(
                    lambda q=q, k=k, v=v, d=d: F.scaled_dot_product_attention(
                        q, k, v, scale=d**-0.5, enable_gqa=True
                    )
                )
                kv_bytes = 2 * k.numel() * k.element_size()
                rows.append((name, batch, n, t_kernel, t_sdpa, kv_bytes / (t_kernel * 1e-3) / 1e9))
                print(rows[-1])
    lines = [
        "",
        f"## Triton split-KV decode vs SDPA — {datetime.date.today()}",
        "",
        f"`python bench/split_kv_gpu.py` — {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16, "
        f"one query token, {args.splits} splits; median of 50 calls (CUDA events).",
        "",
        "| heads x dim | batch | context | split-KV ms | SDPA ms | SDPA / split-KV | split-KV KV read GB/s |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {a} | {b} | {n:,} | {tk:.3f} | {ts:.3f} | {ts / tk:.2f}x | {bw:.0f} |"
            for a, b, n, tk, ts, bw in rows
        ],
    ]
    publish(lines, None if args.no_append else RESULTS)


if __name__ == "__main__":
    main()
