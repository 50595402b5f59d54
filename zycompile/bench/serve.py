"""Drive the zycompile engine with a timed workload: arrivals on the wall clock, max concurrency c."""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist

from zycompile.bench.metrics import RequestTiming
from zycompile.bench.workload import WorkItem
from zycompile.runtime import mixed_step, prefill_worker
from zycompile.runtime.engine import Engine
from zycompile.runtime.generate import Generator, bucket_for
from zycompile.runtime.sampling import SamplingParams


def warmup(gen: Generator, concurrency: int) -> None:
    """Compile every graph the run can need: each prefill bucket (one request into a slot), each
    decode batch bucket up to the one covering ``concurrency`` slots, the mixed steps of the buckets
    past 1 (a prompt chunk beside decoding rows), and the split-thread copies where the engine
    prefills beside decode."""
    dev = gen.device
    prefill = gen.speculator.prefill_chunk if gen.speculator else gen.prefill_chunk
    for width in gen.prefill_buckets:
        prefill([[1] * width], [width], 0, width, torch.tensor([0], device=dev))
    top = bucket_for(concurrency, gen.batch_buckets)
    for b in gen.batch_buckets:
        if b > top:
            break
        pos = torch.full((b, 1), 1, dtype=torch.long, device=dev)
        gen.step(
            torch.ones(b, 1, dtype=torch.long, device=dev), pos, torch.zeros(b, dtype=torch.long, device=dev)
        )
    if gen.mixed_tokens and concurrency > 1:  # decode + a prompt chunk in one forward, per batch bucket
        for b in [b for b in gen.batch_buckets if 1 < b <= top]:  # a chunk's row and a decoding one
            ids, pos = torch.ones(b, dtype=torch.long), torch.ones(b, dtype=torch.long)
            gen.mixed(mixed_step.inputs(ids, pos, [1], 0, gen.mixed_tokens, b - 1, gen.max_seq_len))
    if gen.speculator:  # the verify and drafter graphs of each batch bucket: a few short requests
        for b in [b for b in gen.batch_buckets if b <= top]:
            engine = Engine(gen, max_concurrency=b)
            for _ in range(b):
                engine.add_request(
                    [1, 2, 3] * 3, SamplingParams(max_new_tokens=4 * gen.speculator.k, ignore_eos=True)
                )
            engine.run()
        gen.speculator.stats = type(gen.speculator.stats)()
    prefill_worker.warm(gen, top)  # prefill beside decode: the split-thread graphs (CPU, c >= 2)
    gen.cache.reset()


def _shared_now(t0: float) -> float:
    """Seconds since ``t0``; under torchrun rank 0's clock, so every rank admits the same requests at
    the same step (the ranks of a sharded KV cache must run identical steps)."""
    now = time.perf_counter() - t0
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([now], dtype=torch.float64)
        dist.broadcast(t, src=0)
        now = float(t)
    return now


def serve(gen: Generator, items: list[WorkItem], concurrency: int) -> tuple[list[RequestTiming], Engine]:
    engine = Engine(gen, max_concurrency=concurrency)
    pending = deque(sorted(items, key=lambda it: it.arrival))
    t0 = time.perf_counter()
    reqs = []
    while pending or engine.has_work:
        now = _shared_now(t0)
        while pending and pending[0].arrival <= now:
            it = pending.popleft()
            params = SamplingParams(max_new_tokens=it.output_len, ignore_eos=True)
            reqs.append(engine.add_request(list(it.prompt_ids), params, arrival=t0 + it.arrival))
        if engine.has_work:
            engine.step()
        elif pending:
            time.sleep(max(0.0, pending[0].arrival - (time.perf_counter() - t0)))
    failed = [r for r in reqs if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} benchmark request(s) were rejected; first: {failed[0].error}")
    # Like vLLM's bench with --max-concurrency: a request's clock starts when it is sent, i.e. when
    # one of the c in-flight places frees up (its slot), not when the dataset schedule offered it.
    timings = [
        RequestTiming(max(r.arrival, r.admitted), r.token_times, len(r.prompt), r.cached) for r in reqs
    ]
    return timings, engine
