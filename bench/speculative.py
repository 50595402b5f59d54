"""Speculative decoding benchmark (c=1): each drafter vs zycompile without speculation, in one run.

SmolLM2 fp32, ShareGPT prompts (chat template), 64 new tokens, greedy; every prompt runs on every system
in turn (this host drifts too much to time systems one after another). Asserts that every drafter's
output is token-for-token identical to plain greedy decoding on every prompt (>= 50 by default), and
reports decode tok/s (median over prompts), the speedup over plain zycompile, acceptance rate, mean
accepted drafts per verify and tokens per target forward. HF eager ``generate`` with and without
``prompt_lookup_num_tokens`` runs on the first ``--hf-prompts`` prompts for comparison.

    python bench/speculative.py --drafters ngram early_exit
    python bench/speculative.py --drafters eagle
    python bench/speculative.py --drafters eagle_tree_sampling eagle_chain --temperature 0.7   # sampled

With ``--temperature T > 0`` every system samples (prompt i with seed i). Outputs then differ from
plain decoding by design (rejection sampling keeps the distribution, not the draws), so no identity
is asserted; the tests check the distribution with a chi-square test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import zycompile
from zycompile.bench.machine import machine_line
from zycompile.bench.report import publish
from zycompile.data import sample_sharegpt
from zycompile.models import load_model

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# name -> (recipe, overrides)
NO_CONF = ["speculative.draft_confidence=0.0"]  # the shipped 0.7 gates a tree's second level
DRAFTERS = {
    "ngram_k4": ("smollm2-135m", ["speculative.method=ngram", "speculative.num_tokens=4"]),
    "ngram": (
        "smollm2-135m",
        ["speculative.method=ngram", "speculative.num_tokens=3", "speculative.cost_aware=true"],
    ),
    "early_exit": ("smollm2-135m", ["speculative.method=early_exit", "speculative.exit_layer=20"]),
    # as shipped: a draft tree of the head's 2 best first tokens and, where the better one is >= 70%
    # likely, its best second token; or a prompt-lookup run of up to 3 beside the best first token
    # where the last 3-4 tokens repeat
    "eagle": ("smollm2-135m-eagle", []),
    "eagle_chain": ("smollm2-135m-eagle", ["speculative.tree=[]"]),  # one head draft, or the lookup run
    # as shipped, but sampled rows verify the tree too (tree rejection sampling; with --temperature)
    "eagle_tree_sampling": ("smollm2-135m-eagle", ["speculative.tree_sampling=true"]),
    "eagle_head": ("smollm2-135m-eagle", ["speculative.lookup_tokens=0", "speculative.tree=[]"]),  # k = 1
    "eagle_k2": ("smollm2-135m-eagle", ["speculative.num_tokens=2", "speculative.tree=[]", *NO_CONF]),
    "eagle_k3": ("smollm2-135m-eagle", ["speculative.num_tokens=3", "speculative.tree=[]", *NO_CONF]),
    "eagle_lookup5": ("smollm2-135m-eagle", ["speculative.lookup_tokens=5", "speculative.tree=[]"]),
    # draft trees (speculative.tree), with the same prompt lookup: [2, 1] = the head's 2 best first
    # tokens, and its best second token under the better one
    "eagle_tree21": ("smollm2-135m-eagle", ["speculative.tree=[2, 1]", *NO_CONF]),
    # the shipped tree before 2026-11-29 13:1x
    "eagle_tree2": ("smollm2-135m-eagle", ["speculative.tree=[2]", *NO_CONF]),
    "eagle_f32": ("smollm2-135m-eagle", ["speculative.head_weights=float32"]),  # the head's weights in fp32
    # tree [2, 1], the second level only where the best first draft's probability is >= 0.3 / 0.5 / 0.7
    **{
        f"eagle_tree21_c{c}": (
            "smollm2-135m-eagle",
            ["speculative.tree=[2, 1]", f"speculative.draft_confidence=0.{c}"],
        )
        for c in (3, 5, 7)
    },
    "eagle_tree3": ("smollm2-135m-eagle", ["speculative.tree=[3]", *NO_CONF]),
    "eagle_tree31": ("smollm2-135m-eagle", ["speculative.tree=[3, 1]", *NO_CONF]),
    "eagle_tree32": ("smollm2-135m-eagle", ["speculative.tree=[3, 2]", *NO_CONF]),
    "eagle_tree211": ("smollm2-135m-eagle", ["speculative.tree=[2, 1, 1]", *NO_CONF]),
    "eagle_k3_cost": (
        "smollm2-135m-eagle",
        [
            "speculative.num_tokens=3",
            "speculative.cost_aware=true",
            "speculative.draft_confidence=0.1",
            "speculative.tree=[]",
        ],
    ),
}
# early_exit (5% acceptance) and the variants on request
DEFAULT = ["ngram", "eagle_head", "eagle_chain", "eagle"]


class System:
    """One zycompile configuration, compiled and warmed up, timed one prompt at a time."""

    def __init__(self, recipe, overrides, prompts, new_tokens, log, temperature=0.0):
        self.gen = zycompile.optimize(None, recipe, overrides=overrides).generator()
        self.gen.on_compile = log
        self.new_tokens, self.temperature = new_tokens, temperature
        t0 = time.perf_counter()
        # compiles the graphs (verify widths vary with the drafts; a late one is rare); the last prompt
        # repeats itself, so lookup drafts of every width come up too
        for ids in [*prompts[:2], prompts[0] + prompts[0][-24:] * 4]:
            self.gen.generate([ids], max_new_tokens=new_tokens, ignore_eos=True, **self._sampling(0))
        log(f"warm-up (compile) {time.perf_counter() - t0:.0f}s")
        spec = self.gen.speculator
        self.before = None if spec is None else type(spec.stats)(**vars(spec.stats))
        self.tokens: list[list[int]] = []
        self.rates: list[float] = []

    def _sampling(self, seed: int) -> dict:
        return {"temperature": self.temperature, "seed": seed} if self.temperature else {}

    def run(self, ids) -> None:
        seed = len(self.tokens)  # prompt i samples with seed i on every system
        out = self.gen.generate(
            [ids], max_new_tokens=self.new_tokens, ignore_eos=True, **self._sampling(seed)
        )
        self.tokens.append(out.tokens[0])
        self.rates.append(out.decode_tok_s)

    def stats(self):
        spec = self.gen.speculator
        return None if spec is None else spec.stats.since(self.before).as_dict()


def hf_rate(model, ids, new_tokens, lookup: int | None) -> tuple[float, list[int]]:
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if lookup:
        kw["prompt_lookup_num_tokens"] = lookup
    x = torch.tensor([ids])
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(x, **{**kw, "max_new_tokens": 1, "min_new_tokens": 1})
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, **kw)
        total = time.perf_counter() - t0
    return (new_tokens - 1) / max(total - ttft, 1e-9), out[0, len(ids) :].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafters", nargs="+", choices=list(DRAFTERS), default=DEFAULT)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hf-prompts", type=int, default=10, help="prompts for the HF comparison (0: skip)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (0: greedy)")
    ap.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument(
        "--eagle-head",
        default=None,
        help="also measure each chosen eagle drafter with this head file (`zycompile train-draft`), "
        "beside the recipe's, as <drafter>@<file stem>",
    )
    args = ap.parse_args()
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    base_recipe = zycompile.load_recipe("smollm2-135m")
    tok = load_model(base_recipe.model.source).tokenizer
    reqs = sample_sharegpt(tok, args.prompts, seed=0, max_prompt_len=base_recipe.runtime.prefill_buckets[-1])
    chats = [
        tok.apply_chat_template([{"role": "user", "content": r.prompt}], add_generation_prompt=True)
        for r in reqs
    ]
    prompts = [list(c["input_ids"] if hasattr(c, "keys") else c) for c in chats]
    log(machine_line())

    # Every system is built first, then each prompt runs on every system in turn: this host's speed
    # drifts by 10-20% over minutes, and systems timed one after another measured that drift (EAGLE
    # k = 1 at 0.99x plain at 11:19, 1.2-1.3x interleaved minutes later).
    log("zycompile, no speculation")
    temp = args.temperature
    systems = {"plain": System("smollm2-135m", [], prompts, args.new_tokens, log, temp)}
    runs = {name: DRAFTERS[name] for name in args.drafters}
    if args.eagle_head:
        head = Path(args.eagle_head).resolve()
        if not head.is_file():
            sys.exit(f"--eagle-head {args.eagle_head}: no such file")
        for name, (recipe, overrides) in list(runs.items()):
            if recipe.endswith("eagle"):
                runs[f"{name}@{head.stem}"] = (recipe, [*overrides, f"speculative.eagle_head={head}"])
    for name, (recipe, overrides) in runs.items():
        log(f"zycompile + {name}")
        systems[name] = System(recipe, overrides, prompts, args.new_tokens, log, temp)
    for i, ids in enumerate(prompts):
        log(f"prompt {i + 1}/{len(prompts)}")
        for system in systems.values():
            system.run(ids)
    base = systems.pop("plain")
    ref, base_rate = base.tokens, statistics.median(base.rates)
    rows = [("zycompile (no speculation)", len(prompts), base_rate, None, "reference", None)]
    failures = []
    for name, system in systems.items():
        same = sum(a == b for a, b in zip(system.tokens, ref))
        if same != len(ref) and not temp:
            failures.append(f"{name}: {len(ref) - same} of {len(ref)} prompts differ from plain greedy")
        paired = statistics.median(r / b for r, b in zip(system.rates, base.rates))
        rate = statistics.median(system.rates)
        ident = f"{same}/{len(ref)}" if not temp else "sampled"
        rows.append((f"zycompile + {name}", len(prompts), rate, system.stats(), ident, paired))
    if args.hf_prompts and not temp:
        hf = load_model(base_recipe.model.source, base_recipe.model.dtype).model
        sub = prompts[: args.hf_prompts]
        for label, lookup in (("HF eager generate", None), ("HF eager prompt lookup (4 tokens)", 4)):
            log(label)
            hf_rate(hf, sub[0], 8, lookup)  # warm-up
            res = [hf_rate(hf, ids, args.new_tokens, lookup) for ids in sub]
            same = sum(t == r for (_, t), r in zip(res, ref))
            rows.append(
                (label, len(sub), statistics.median(r for r, _ in res), None, f"{same}/{len(sub)}", None)
            )

    mode = f"sampled at temperature {temp} (prompt i: seed i)" if temp else "greedy"
    lines = [
        f"\n## speculative decoding c=1 — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python bench/speculative.py {' '.join(sys.argv[1:])}` — {machine_line()}",
        f"SmolLM2-135M-Instruct fp32, recipe `smollm2-135m` (+ speculative overrides), {len(prompts)} ShareGPT "
        f"prompts (chat template), {args.new_tokens} new tokens, {mode}; every prompt runs on every system in "
        "turn; decode tok/s = median over prompts; per-prompt speedup = median over prompts of the system's "
        "tok/s over plain's on the same prompt; identical = prompts whose output equals zycompile's plain "
        "greedy output token for token",
        "",
        "| system | prompts | decode tok/s | vs zycompile plain | per-prompt speedup | drafts / verify "
        "| acceptance | mean accepted / verify | tokens / target forward | identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, n, rate, st, same, paired in rows:
        acc = (
            " |  |  | "
            if st is None
            else f"{st['drafted'] / max(st['rounds'], 1):.2f} | {st['acceptance_rate']:.0%} | "
            f"{st['mean_accepted']:.2f} | {st['tokens_per_forward']:.2f}"
        )
        pair = "" if paired is None else f"{paired:.2f}x"
        lines.append(f"| {name} | {n} | {rate:.1f} | {rate / base_rate:.2f}x | {pair} | {acc} | {same} |")
    for name, (recipe, overrides) in runs.items():
        lines.append(f"- {name}: recipe `{recipe}` {' '.join(f'--set {o}' for o in overrides)}".rstrip())
    publish(lines, None if args.no_write else RESULTS)
    if failures:
        sys.exit("greedy identity FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()
