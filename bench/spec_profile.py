"""Where one speculative decode round spends its time on this machine (SmolLM2 fp32, batch 1).

Times, after warm-up, the pieces of a round against a plain decode step: the target verify forward at
width k+1 (k = 1..--max-k), the EAGLE head's draft calls (catch-up over num_tokens+1 entries, then one
token; the draft-vocabulary GEMV included), the ngram lookup in Python, and the greedy acceptance.
Medians of --repeats calls; nothing is published (use bench/speculative.py for end-to-end numbers).

    python bench/spec_profile.py --max-k 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import zycompile
from zycompile.bench.machine import machine_line
from zycompile.runtime.drafters import NgramDrafter
from zycompile.runtime.speculative import accept_greedy


def timed(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2-135m-eagle")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--max-k", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=300, help="cache position the timed calls run at")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    print(machine_line(), file=sys.stderr)
    ov = [f"speculative.num_tokens={args.max_k}", *args.overrides]
    gen = zycompile.optimize(None, args.recipe, overrides=ov).generator()
    spec = gen.speculator
    p = args.ctx
    rows = []
    one = torch.ones(1, 1, dtype=torch.long)
    plain = timed(lambda: gen.step(one, torch.tensor([[p]]), torch.zeros(1, dtype=torch.long)), args.repeats)
    rows.append(("plain decode step (M=1)", plain))
    for k in range(1, args.max_k + 1):
        ids = torch.ones(1, k + 1, dtype=torch.long)
        pos = (p + torch.arange(k + 1))[None]
        rows.append(
            (
                f"verify forward M={k + 1} (k={k})",
                timed(lambda i=ids, q=pos: spec.forward(i, q), args.repeats),
            )
        )
    dr = spec.drafter
    if hasattr(dr, "draft"):  # EAGLE: catch-up call over the pending entries, then one-token calls
        w = dr.width
        feat = dr.feat[:1]
        ids = torch.ones(1, w, dtype=torch.long)
        pos = (p + torch.arange(w))[None]
        zero = torch.zeros(1, dtype=torch.long)
        rows.append(
            (f"eagle catch-up draft call (width {w})", timed(lambda: dr.draft(feat, ids, pos, zero), 30))
        )
        rows.append(
            (
                "eagle one-token draft call",
                timed(lambda: dr.draft(feat[:, :1], ids[:, :1], pos[:, :1], zero), args.repeats),
            )
        )
        rows.append((f"  (draft vocabulary: {dr.head.vocab_ids.numel()} tokens)", None))
    ctx = [list(range(1000, 1000 + p))]
    ng = NgramDrafter(3, 1)
    rows.append(
        ("ngram lookup, 300-token context, no match (Python)", timed(lambda: ng.lookup(ctx[0], 4), 10))
    )
    logits = torch.randn(1, 5, gen.model.config.vocab_size)
    draft = torch.ones(1, 4, dtype=torch.long)
    rows.append(
        (
            "accept_greedy k=4 (+ .tolist())",
            timed(lambda: [t.tolist() for t in accept_greedy(draft, logits)], 50),
        )
    )
    print("| piece | ms | vs plain step |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | | |" if ms is None else f"| {name} | {ms:.2f} | {ms / plain:.2f}x |")


if __name__ == "__main__":
    main()
