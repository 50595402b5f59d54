"""Prefill beside decode on a CPU (``runtime.prefill_overlap: true``): one request's prompt runs on a
background thread with half the cores while the engine keeps decoding the others on the rest.

Prefill is compute-bound and decode bandwidth-bound, so side by side each barely slows the other: on
the 2-core EPYC, one thread each, a compiled batch-8 SmolLM2 decode step and a 250-token prefill each
slowed by 1-7% against running alone on one thread (bench/prefill_overlap.py). It pays only where
decode on half the cores is nearly as fast as on all of them, and it is off by default because on
that box it is not: one core decodes batch 8 1.5-1.7x slower than two, so side by side did the same
work only 1.09-1.26x faster than one after the other, and the paired 64-prompt c=8 bench moved +2%
(124.5 -> 127.0 tok/s): the running rows' TPOT p99 fell 242 -> 77 ms, the new requests' TTFT
median rose 137 -> 504 ms (their prompts run at half speed). bench/prefill_overlap.py measures the
same on another machine.

Each side gets its own compiled graphs: Dynamo guards on ``torch.get_num_threads()`` and Inductor's CPU
kernels bake the thread count in, so the decode graphs at ``decode_threads`` and the prefill graph at
``prefill_threads`` are compiled once each beside the full-width ones: by ``warm`` before a timed run,
else on first use, and a step that may compile runs alone (compile_gate.py). The compiled kernels release the GIL in their GEMMs and
attention; the two threads write different cache slots (the prefilling row's decode entry goes to a
position the prefill does not write: ``Engine._idle_pos``), Inductor scatters K/V into the cache in
place (AOTAutograd alone would write whole cache tensors back, so other backends are refused), and
the cache's per-step state is traced into each graph as its inputs. Not with drafters (their caches
have their own rows), sharded caches or accelerators.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from zycompile.errors import RecipeError
from zycompile.intraop import init_thread, threads
from zycompile.runtime.generate import Generator


def overlap_threads(gen: Generator) -> tuple[int, int] | None:
    """(decode threads, prefill threads) while a prefill runs beside decode, or None when it does not."""
    recipe = getattr(gen, "recipe", None)  # None: a loaded export package (its own graphs, no recipe)
    if recipe is None or not recipe.runtime.prefill_overlap:
        return None
    total = torch.get_num_threads()
    why = why_not(gen) or (f"{total} intra-op thread (it needs 2 or more)" if total < 2 else None)
    if why is not None:
        raise RecipeError(f"runtime.prefill_overlap: true cannot apply here: {why}; set it to false")
    prefill = total // 2
    return total - prefill, prefill


def why_not(gen: Generator) -> str | None:
    """None when this generator's prefill can run beside its decode, else why not."""
    if gen.device.type != "cpu":
        return f"device {gen.device.type} (a CPU overlap: accelerators queue work on streams)"
    if gen.speculator is not None:
        return "speculative decoding (the drafter's caches are not split per caller)"
    if gen.recipe.lowering.backend != "inductor":
        # AOTAutograd without Inductor writes each mutated cache tensor back whole after a step,
        # over the other thread's rows; Inductor scatters into the cache in place
        return f"lowering.backend {gen.recipe.lowering.backend!r} (it needs inductor)"
    if not gen.cache.can_move_rows or gen.recipe.parallel.mode != "none":
        return f"parallel.mode {gen.recipe.parallel.mode!r}"
    return None


class PrefillWorker:
    """One background thread running whole prompts into cache rows; one job at a time."""

    def __init__(self, gen: Generator, prefill_threads: int):
        self.gen, self.threads = gen, prefill_threads
        self.pool = ThreadPoolExecutor(
            1, thread_name_prefix="zycompile-prefill", initializer=init_thread, initargs=(prefill_threads,)
        )
        self.job: tuple[Any, Future] | None = None  # (request, its logits)

    @classmethod
    def of(cls, gen: Generator, prefill_threads: int) -> PrefillWorker:
        """The generator's worker (one per generator: its graphs are compiled once, for its thread)."""
        worker = getattr(gen, "_prefill_worker", None)
        if worker is None or worker.threads != prefill_threads:
            worker = gen._prefill_worker = cls(gen, prefill_threads)
        return worker

    @property
    def busy(self) -> bool:
        return self.job is not None

    def submit(self, req: Any) -> None:
        """Start filling ``req``'s slot from ``req.prefilled`` to the end of its prompt."""
        assert self.job is None, "one prefill at a time"
        self.job = (req, self.pool.submit(self.prefill, req.prompt, req.prefilled, req.slot))

    def prefill(self, prompt: list[int], start: int, slot: int) -> torch.Tensor:
        gen = self.gen
        rows = torch.tensor([slot], device=gen.device)
        chunk = len(prompt) - start if gen.dynamic_prefill else gen.prefill_buckets[-1]
        logits = None
        while start < len(prompt):
            count = min(chunk, len(prompt) - start)
            logits = gen.prefill_chunk([prompt], [len(prompt)], start, count, rows)
            start += count
        return logits

    def result(self, wait: bool) -> tuple[Any, torch.Tensor] | None:
        """(request, logits after its prompt) once the job is done (blocking if ``wait``), else None."""
        if self.job is None or not (wait or self.job[1].done()):
            return None
        req, fut = self.job
        self.job = None
        return req, fut.result()  # re-raises the prefill's error here, on the engine's thread


def warm(gen: Generator, top_batch: int) -> None:
    """Compile the overlap's graphs before a timed run (the engine would compile them on first use): the
    prefill graph(s) on the worker's thread, and the decode graphs up to ``top_batch`` at the decode
    side's thread count. Cheap once compiled (a few short steps); writes cache row 0."""
    split = overlap_threads(gen)
    if split is None or top_batch < 2:
        return
    decode_threads, prefill_threads = split
    worker = PrefillWorker.of(gen, prefill_threads)
    dev = gen.device
    # one symbolic-length graph when prefill is dynamic (any width >= 2), else one per bucket
    widths = [max(2, gen.prefill_buckets[0])] if gen.dynamic_prefill else gen.prefill_buckets
    for w in widths:
        worker.pool.submit(gen.prefill_chunk, [[1] * w], [w], 0, w, torch.tensor([0], device=dev)).result()
    with threads(decode_threads):
        for b in gen.batch_buckets:
            if b > top_batch:
                break
            ids = torch.ones(b, 1, dtype=torch.long, device=dev)
            pos = torch.ones(b, 1, dtype=torch.long, device=dev)
            gen.step(ids, pos, torch.zeros(b, dtype=torch.long, device=dev))
