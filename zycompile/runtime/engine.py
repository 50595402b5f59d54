"""Continuous batching over the static KV cache's rows (slots).

Each ``step()`` does at most one prefill chunk (of one waiting request, into its slot) and then one
decode step for every request already decoding, so new requests' prefill interleaves with the
others' decoding and nobody's tokens stall for a whole long prompt. With no request decoding (and a
symbolic-length prefill graph) the chunk is the whole rest of the prompt: nobody is waiting. A prompt
that opens like an earlier one starts from the prefix cache's copy of those blocks (prefix_cache.py).
Requests take the lowest free slot; the decode batch is the smallest batch bucket covering the
highest busy slot, so there is one compiled decode graph per bucket and no recompiles in steady
state; when requests finish, the one in the highest slot moves down (its filled KV slots copied) if
that lets a smaller bucket serve the rest. A request that cannot run (too long, empty, bad sampling
parameters) is rejected alone with its error; the others go on.

With ``runtime.prefill_overlap: true`` (a CPU, 2+ threads), a new request's prompt runs on a background
thread with half the cores while the running requests keep decoding on the other half
(prefill_worker.py, which says when that pays). Its first token is sampled when the engine next looks
(after the decode step in flight), and rows are not compacted while a prompt is being written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from zycompile.errors import GenerationError
from zycompile.intraop import threads
from zycompile.runtime import mixed_step
from zycompile.runtime.generate import Generator, bucket_for
from zycompile.runtime.prefill_worker import PrefillWorker, overlap_threads
from zycompile.runtime.prefix_cache import prefix_cache_for
from zycompile.runtime.sampling import SamplingParams, sample


@dataclasses.dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    id: int = 0
    arrival: float = 0.0
    admitted: float | None = None  # when it got a slot (a client limited to c in flight sends it then)
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    cached: int = 0  # of which copied from the prefix cache
    output: list[int] = dataclasses.field(default_factory=list)
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish: float | None = None
    error: str | None = None
    next_token: int | None = None  # sampled, not yet fed back
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None


class Engine:
    def __init__(
        self,
        generator: Generator,
        max_concurrency: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.gen = generator
        self.slots = generator.cache.batch
        self.max_concurrency = min(max_concurrency or self.slots, self.slots)
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.finished: list[Request] = []
        self.eos = generator.eos_ids()
        self.decode_steps = 0
        self.moves = 0  # requests moved to a lower slot (_compact)
        self._next_id = 0
        # one per engine: a benchmark run never hits the prompts of an earlier run
        self.prefix = prefix_cache_for(generator)
        # prefill beside decode: (decode threads, worker) while a prompt runs on the worker
        split = overlap_threads(generator) if self.max_concurrency > 1 else None
        self.worker = None if split is None else PrefillWorker.of(generator, split[1])
        self.decode_threads = None if split is None else split[0]
        self.overlapped = 0  # prompts prefilled beside decode steps

    # ---- admission -----------------------------------------------------------------------------

    def add_request(
        self, prompt: Any, params: SamplingParams | None = None, arrival: float | None = None
    ) -> Request:
        """Queue a request (token ids or text). Invalid requests come back finished with ``error`` set."""
        params = params or SamplingParams()
        req = Request(
            prompt=[], params=params, id=self._next_id, arrival=self.clock() if arrival is None else arrival
        )
        self._next_id += 1
        try:
            req.prompt = (
                prompt
                if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
                else self.gen.encode(prompt)[0]
            )
            if not req.prompt:
                raise GenerationError("empty prompt: give at least one token")
            need = len(req.prompt) + params.max_new_tokens
            if need > self.gen.max_seq_len:
                raise GenerationError(
                    f"prompt of {len(req.prompt)} tokens + max_new_tokens={params.max_new_tokens} needs {need} "
                    f"positions; runtime.max_seq_len is {self.gen.max_seq_len}"
                )
        except GenerationError as e:
            req.error, req.finish = str(e), req.arrival
            self.finished.append(req)
            return req
        if params.seed is not None:
            req.generator = torch.Generator().manual_seed(params.seed)
        self.waiting.append(req)
        return req

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_concurrency:
            slot = self._lowest_free(self.slots)
            req = self.waiting.popleft()
            req.slot, req.admitted = slot, self.clock()
            self.running[slot] = req

    def _lowest_free(self, below: int) -> int | None:
        return min(set(range(below)) - set(self.running), default=None)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one engine iteration ------------------------------------------------------------------

    def step(self) -> None:
        self._admit()
        if self.worker is not None:
            self._collect(wait=False)
        in_flight = self._in_flight
        prefilling = [r for r in self.running.values() if r.prefilled < len(r.prompt) and r is not in_flight]
        decoding = self._decoding()
        if prefilling and in_flight is None:  # the worker runs one prompt at a time
            req = min(prefilling, key=lambda r: r.id)
            if self.gen.mixed_tokens and decoding:
                self._mixed(decoding, req)
                decoding = []  # decoded by the mixed step
            elif self.worker is not None and decoding and len(req.prompt) - req.prefilled >= 2:
                self._start_background(req)
            else:
                self._prefill_chunk(req)
        if decoding:
            with threads(self.decode_threads) if self._in_flight else contextlib.nullcontext():
                self._decode(decoding)
        elif self._in_flight:
            self._collect(wait=True)  # nothing else to do: wait for the prompt
        for slot in [s for s, r in self.running.items() if r.done]:
            self.finished.append(self.running.pop(slot))
        if not self._in_flight:  # never move a row being written
            self._compact()

    @property
    def _in_flight(self) -> Request | None:
        """The request whose prompt the worker is running, if any."""
        return self.worker.job[0] if self.worker is not None and self.worker.busy else None

    def _start_background(self, req: Request) -> None:
        self._load_prefix(req)
        self.worker.submit(req)
        self.overlapped += 1

    def _collect(self, wait: bool) -> None:
        done = self.worker.result(wait)
        if done is None:
            return
        req, logits = done
        req.prefilled = len(req.prompt)
        self._first_token(req, logits)

    def _compact(self) -> None:
        """Move the request in the highest slot to the lowest free one while that shrinks the decode
        batch's bucket: a long reply left in slot 7 would otherwise run every step at batch 8 (a batch-8
        step over one row cost ~45-50 ms on the 2-core Xeon, a batch-1 step ~35). Copies the request's
        filled slots once. Not with a drafter (its own caches hold rows too) or a sequence-sharded cache."""
        if self.gen.speculator is not None or not self.gen.cache.can_move_rows:
            return
        buckets = self.gen.batch_buckets
        while self.running:
            top = max(self.running)
            free = self._lowest_free(top)
            if free is None:
                return
            rest = max((s for s in self.running if s != top), default=-1)
            if bucket_for(max(rest, free) + 1, buckets) >= bucket_for(top + 1, buckets):
                return
            req = self.running.pop(top)
            filled = min(req.prefilled + len(req.output), self.gen.max_seq_len)
            self.gen.cache.move_row(top, free, filled)
            req.slot = free
            self.running[free] = req
            self.moves += 1

    def _load_prefix(self, req: Request) -> None:
        """Before a prompt's first chunk: copy the prefix cache's blocks of its opening into its slot."""
        if req.prefilled == 0 and self.prefix is not None:
            req.prefilled = req.cached = self.prefix.load(req.prompt, req.slot)  # leaves >= 1 token to run

    def _prefill_chunk(self, req: Request) -> None:
        self._load_prefix(req)
        chunk = self.gen.prefill_buckets[-1]
        left = len(req.prompt) - req.prefilled
        if self.gen.dynamic_prefill and self.gen.speculator is None and not self._decoding():
            # Nobody waits on a decode step: the rest of the prompt in one forward of the symbolic-length
            # graph. Chunks would re-read every weight per chunk and mask whole key rectangles (a
            # 1,045-token prompt took 1.13x HF eager's TTFT in 256-token chunks). A drafter's prompt
            # entries are sized by the buckets, so speculative prefill keeps them.
            chunk = left
        count = min(chunk, left)
        rows = torch.tensor([req.slot], device=self.gen.device)
        prefill = self.gen.speculator.prefill_chunk if self.gen.speculator else self.gen.prefill_chunk
        logits = prefill([req.prompt], [len(req.prompt)], req.prefilled, count, rows)
        req.prefilled += count
        if req.prefilled == len(req.prompt):
            self._first_token(req, logits)

    def _first_token(self, req: Request, logits: torch.Tensor) -> None:
        tok = sample(logits, [req.params], [req.generator])[0].item()
        self._emit(req, tok)
        if self.prefix is not None:  # after the first token: keeping blocks is not on its clock
            self.prefix.store(req.prompt, req.slot)

    def _decoding(self) -> list[Request]:
        return [r for r in self.running.values() if r.next_token is not None and not r.done]

    def _decode(self, reqs: list[Request]) -> None:
        bsz = bucket_for(max(self.running) + 1, self.gen.batch_buckets)
        if self.gen.speculator:
            return self._decode_speculative(reqs, bsz)
        ids, pos = self._decode_inputs(reqs, bsz)
        dev = self.gen.device
        logits = self.gen.step(
            ids[:, None].to(dev), pos[:, None].to(dev), torch.zeros(bsz, dtype=torch.long, device=dev)
        )
        self._sample_decoded(reqs, logits)

    def _mixed(self, reqs: list[Request], req: Request) -> None:
        """One mixed step: decode ``reqs`` and run the next chunk of ``req``'s prompt in the same forward."""
        self._load_prefix(req)
        bsz = bucket_for(max(self.running) + 1, self.gen.batch_buckets)
        ids, pos = self._decode_inputs(reqs, bsz)
        width = self.gen.mixed_tokens
        chunk = req.prompt[req.prefilled : req.prefilled + width]
        args = mixed_step.inputs(ids, pos, chunk, req.prefilled, width, req.slot, self.gen.max_seq_len)
        logits = self.gen.mixed(args)
        req.prefilled += len(chunk)
        self._sample_decoded(reqs, logits[:bsz])
        if req.prefilled == len(req.prompt):
            self._first_token(req, logits[bsz:])

    def _decode_inputs(self, reqs: list[Request], bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token and position [bsz] of each row of a decode step (idle rows: token 0 at ``_idle_pos``)."""
        ids = torch.zeros(bsz, dtype=torch.long)
        pos = torch.tensor([self._idle_pos(slot) for slot in range(bsz)], dtype=torch.long)
        for r in reqs:
            ids[r.slot] = r.next_token
            pos[r.slot] = len(r.prompt) + len(r.output) - 1
        return ids, pos

    def _sample_decoded(self, reqs: list[Request], logits: torch.Tensor) -> None:
        self.decode_steps += 1
        bsz = logits.shape[0]
        params = [SamplingParams()] * bsz
        gens: list[torch.Generator | None] = [None] * bsz
        for r in reqs:
            params[r.slot], gens[r.slot] = r.params, r.generator
        toks = sample(logits, params, gens).tolist()
        for r in reqs:
            self._emit(r, toks[r.slot])

    def _idle_pos(self, slot: int) -> int:
        """Where an idle row of the decode batch writes its (ignored) K/V: a position nobody reads first.

        A free slot writes at 0 (its next request prefills from 0); a slot whose request is still
        prefilling writes at the prompt's end, which its first decode step rewrites before reading. Both
        keep the row's causal mask short, so CPU attention can skip the empty cache tail: an idle row at
        the last position would make every row of the batch read all ``max_seq_len`` keys.
        """
        req = self.running.get(slot)
        return 0 if req is None else min(len(req.prompt), self.gen.max_seq_len - 1)

    def _decode_speculative(self, reqs: list[Request], bsz: int) -> None:
        """One draft + verify round over the batch; each request keeps its own accepted length."""
        ctx: list[list[int]] = [[] for _ in range(bsz)]  # idle rows: empty (the drafters skip them)
        pending = torch.zeros(bsz, dtype=torch.long)
        pos = torch.full((bsz,), self.gen.max_seq_len - 1, dtype=torch.long)
        params = [SamplingParams()] * bsz
        gens: list[torch.Generator | None] = [None] * bsz
        active = [False] * bsz
        for r in reqs:
            ctx[r.slot] = r.prompt + r.output
            pending[r.slot], pos[r.slot] = r.next_token, len(ctx[r.slot]) - 1
            params[r.slot], gens[r.slot], active[r.slot] = r.params, r.generator, True
        gained = self.gen.speculator.round(ctx, pending, pos, params, gens, active)
        self.decode_steps += 1
        for r in reqs:
            for tok in gained[r.slot]:
                if r.done:
                    break
                self._emit(r, tok)
                self.gen.speculator.stats.emitted += 1

    def _emit(self, req: Request, tok: int) -> None:
        now = self.clock()
        if tok in self.eos and not req.params.ignore_eos:
            req.finish, req.next_token = now, None
            if not req.token_times:  # EOS as the very first token still ends the first-token wait
                req.token_times.append(now)
            return
        req.output.append(tok)
        req.token_times.append(now)
        req.next_token = tok
        if len(req.output) >= req.params.max_new_tokens or self.gen.hit_stop(req.output, req.params.stop):
            req.finish = now

    def run(self) -> list[Request]:
        """Run until every queued request is finished; returns them in id order."""
        while self.has_work:
            self.step()
        return sorted(self.finished, key=lambda r: r.id)
