"""Benchmark workloads: which prompts, how long the replies, and when each request arrives."""

from __future__ import annotations

import dataclasses
import random

from zycompile.data import SampledRequest, sample_random, sample_sharegpt


@dataclasses.dataclass(frozen=True)
class WorkItem:
    prompt_ids: tuple[int, ...]
    output_len: int
    arrival: float  # seconds after the start of the run


def arrival_times(n: int, mode: str, rate: float | None, seed: int = 0) -> list[float]:
    """``burst``: all at t=0; ``interval``: one every 1/rate s; ``poisson``: exponential gaps, mean 1/rate."""
    if mode == "burst" or rate is None or rate == float("inf"):
        return [0.0] * n
    if rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (got {rate})")
    if mode == "interval":
        return [i / rate for i in range(n)]
    if mode == "poisson":
        rng = random.Random(seed)
        t, out = 0.0, []
        for _ in range(n):
            out.append(t)
            t += rng.expovariate(rate)
        return out
    raise ValueError(f"arrival mode {mode!r}: allowed burst, interval, poisson")


def build_workload(
    tokenizer,
    encode,
    *,
    num_prompts: int,
    seed: int,
    dataset: str,
    input_len: int | None,
    output_len: int | None,
    prefix_len: int = 0,
    max_output_len: int,
    max_prompt_len: int,
    arrival: str,
    rate: float | None,
) -> list[WorkItem]:
    """Prompts (ShareGPT, or random tokens when ``dataset='random'``) with chat templates applied."""
    prefix: list[int] = []
    if prefix_len < 0 or (prefix_len and dataset != "random"):
        raise ValueError(f"--prefix-len {prefix_len}: expected a count >= 0, with --dataset random")
    if dataset == "random":
        if not input_len or not output_len:
            raise ValueError("--dataset random needs --input-len and --output-len")
        reqs: list[SampledRequest] = sample_random(tokenizer, num_prompts, input_len, output_len, seed=seed)
        if prefix_len:  # drawn from another seed than the prompts, the same for every request
            prefix = list(sample_random(tokenizer, 1, prefix_len, 1, seed=seed + 1)[0].prompt_token_ids)
    else:
        reqs = sample_sharegpt(
            tokenizer, num_prompts, seed=seed, max_output_len=max_output_len, max_prompt_len=max_prompt_len
        )
    times = arrival_times(len(reqs), arrival, rate, seed)
    items = []
    for r, t in zip(reqs, times):
        ids = prefix + list(r.prompt_token_ids) if dataset == "random" else encode(r.prompt)
        out_len = output_len if output_len else r.output_len
        items.append(WorkItem(tuple(ids), out_len, t))
    return items
