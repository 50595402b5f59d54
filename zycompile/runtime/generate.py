"""Prefill then decode over a static KV cache, gpt-fast style: one short step function, compiled from outside.

``step(input_ids [B, T], pos [B, T], last [B]) -> logits [B, V]`` is the only compiled function.
Shapes are static per (batch bucket, prefill bucket), so the decode graph (T = 1) compiles once per
batch bucket and never again while generating; prompts longer than the largest prefill bucket are
prefilled in chunks of it.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from zycompile.errors import GenerationError
from zycompile.ops import cpu_decode_attention, cpu_kernels
from zycompile.ops.attention import position_mask
from zycompile.runtime import mixed_step
from zycompile.runtime.compile_gate import CompileGate
from zycompile.runtime.metrics import kv_bytes_per_token, mbu, measure_read_bandwidth, weight_bytes_per_token
from zycompile.runtime.sampling import SamplingParams, sample
from zycompile.runtime.sharded_kv_cache import cache_for_recipe
from zycompile.runtime.step_cache import compile_cached_step, compile_verb


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per prompt (stop tokens excluded)
    texts: list[str] | None
    prompt_lens: list[int]
    ttft_s: float
    decode_s: float
    decode_steps: int
    mbu: float | None = None
    speculative: dict | None = None  # SpecStats.as_dict() of this call, when the recipe speculates

    @property
    def decode_tok_s(self) -> float:
        """Per-sequence decode rate (tokens after the first, per second)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= n), buckets[-1])


class Generator:
    def __init__(self, optimized: Any):
        self.opt = optimized
        self.model = optimized.model
        self.recipe = optimized.recipe
        self.tokenizer = optimized.tokenizer
        rt = self.recipe.runtime
        self.max_seq_len = rt.max_seq_len
        self.batch_buckets, self.prefill_buckets = rt.batch_buckets, rt.prefill_buckets
        self.dynamic_prefill = rt.prefill == "dynamic"
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.device.type == "cpu" and self.dtype in cpu_decode_attention.KERNEL_DTYPES:
            cpu_decode_attention.load()  # build (first run on a machine) or load it now, not in a timed step
        self.cache = cache_for_recipe(
            self.recipe, self.model.config, rt.batch_buckets[-1], self.dtype, self.device
        )
        self.decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        self.head = (
            self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        )
        target = self.decoder if self._can_split_head() else self.model
        names = inspect.signature(target.forward).parameters
        self.cache_kw = "cache" if "cache" in names else "past_key_values"
        self.compiled_step = compile_cached_step(
            self._step, optimized.backend, self, ("input_ids", "pos", "last", "rows", "keys")
        )
        self.seen_shapes: set[tuple] = set()
        self.gate = CompileGate()
        self.threads = torch.get_num_threads()
        self.on_compile: Callable[[str], None] | None = None
        self.bandwidth: float | None = None
        self.weight_bytes = 0
        from zycompile.runtime.speculative import build_speculator  # it imports this module

        self.speculator = build_speculator(self)  # None unless recipe.speculative.method is set
        # mixed steps (runtime/mixed_step.py): chunk width, 0 when off or impossible (said once, here)
        self.mixed_tokens = rt.mixed_prefill_tokens
        if self.mixed_tokens:
            why = mixed_step.why_not(self)
            if why is not None:
                print(f"zycompile: runtime.mixed_prefill_tokens ignored: {why}", file=sys.stderr)
                self.mixed_tokens = 0
            else:
                mixed_step.register()
                impl = mixed_step.ATTN_IMPLEMENTATION  # SDPA's function but in mixed steps
                if self.model.config._attn_implementation != impl:
                    self.model.set_attn_implementation(impl)
                self.compiled_mixed = compile_cached_step(
                    self._mixed_step,
                    optimized.backend,
                    self,
                    ("input_ids", "pos", "rows", "chunk_visible", "chunk_row", "last"),
                )

    def _can_split_head(self) -> bool:
        # Gather the last hidden state per row before the LM head (prefill computes V logits for one
        # token per row, not for the whole bucket). Models that post-process logits keep the full path.
        cfg = self.model.config
        return (
            self.decoder is not None
            and isinstance(self.head, torch.nn.Linear)
            and not getattr(cfg, "final_logit_softcapping", None)
            and getattr(cfg, "logit_scale", None) is None
        )

    # ---- the compiled step ---------------------------------------------------------------------

    def _step(
        self,
        input_ids: torch.Tensor,
        pos: torch.Tensor,
        last: torch.Tensor,
        rows: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cache = self.cache
        cache.set_step(pos, rows, keys)
        # global position of every slot read (this rank's slice when sharded; a prefix in prefill)
        keys = cache.key_positions if keys is None else keys
        mask = position_mask(keys, pos)  # [B, 1, T, S]: causal per row
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        kwargs = {self.cache_kw: cache, "attention_mask": mask, "position_ids": pos, "use_cache": True}
        if self._can_split_head():
            hidden = self.decoder(input_ids=input_ids, **kwargs).last_hidden_state
            return self.head(hidden[rows, last]).float()
        logits = self.model(input_ids=input_ids, **kwargs).logits
        return logits[rows, last].float()

    def _mixed_step(
        self,
        input_ids: torch.Tensor,
        pos: torch.Tensor,
        rows: torch.Tensor,
        chunk_visible: torch.Tensor,
        chunk_row: torch.Tensor,
        last: torch.Tensor,
    ) -> torch.Tensor:
        """A mixed step (``mixed_step.inputs``): logits [B + 1, V] after each decode token and the chunk's last."""
        cache = self.cache
        cache.set_mixed_step(pos, rows)
        layout = mixed_step.layout_for(cache.key_positions, pos, chunk_visible, chunk_row)
        kwargs = {self.cache_kw: cache, "position_ids": pos, "use_cache": True, "zy_mixed": layout}
        hidden = self.decoder(
            input_ids=input_ids, attention_mask=layout.decode_mask, **kwargs
        ).last_hidden_state
        return self.head(hidden[0, last]).float()

    def mixed(self, args: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run a mixed step from ``mixed_step.inputs``' arguments (moved to the device here)."""
        args = {k: t.to(self.device) for k, t in args.items()}
        b = args["chunk_visible"].shape[0]
        key = ("mixed", b, self.mixed_tokens, torch.get_num_threads())
        what = f"mixed graph for batch {b} + {self.mixed_tokens} prompt tokens"
        return self._run(self.compiled_mixed, key, what, *args.values())

    def step_key(self, batch: int, tokens: int, whole_rows: bool = True) -> tuple:
        """The key of ``step``'s graph for these shapes (in ``seen_shapes`` once it is compiled): batch,
        tokens ("dyn" for the symbolic-length prefill), whether it runs rows 0..B-1, and the intra-op
        thread count (Dynamo guards on it: another count is another graph)."""
        width = "dyn" if self.dynamic_prefill and tokens > 1 else tokens
        return batch, width, whole_rows, torch.get_num_threads()

    def step(
        self,
        input_ids: torch.Tensor,
        pos: torch.Tensor,
        last: torch.Tensor,
        rows: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits after token ``last[b]`` of each row; ``rows`` picks cache rows (default 0..B-1), ``keys``
        the slots attended over (``prefill_keys``; default all)."""
        key = self.step_key(input_ids.shape[0], input_ids.shape[1], rows is None)
        kind = "decode" if key[1] == 1 else "prefill"
        width = "" if key[3] == self.threads else f", {key[3]} thread{'s' * (key[3] > 1)}"
        what = f"{kind} graph for batch {key[0]} x {key[1]} tokens{width}"
        return self._run(self.compiled_step, key, what, input_ids, pos, last, rows, keys)

    def _run(self, compiled: Callable, key: tuple, what: str, *args: Any) -> torch.Tensor:
        """Call a compiled step; the first call of a graph ``key`` is announced (``on_compile``: "compiling
        <what>" or "loading saved <what>") and runs alone: it may compile, and the engine's prefill worker
        runs steps on another thread."""
        first = key not in self.seen_shapes
        if first:
            self.seen_shapes.add(key)
            if self.on_compile:
                self.on_compile(f"{compile_verb(compiled, *args)} {what}")
        with torch.no_grad(), self.gate.exclusive() if first else self.gate.shared():
            return compiled(*args)

    # ---- inputs --------------------------------------------------------------------------------

    def encode(
        self, prompts: Any, attention_mask: torch.Tensor | None = None, chat: bool | None = None
    ) -> list[list[int]]:
        """Strings (chat template applied when the tokenizer has one), token lists, or a padded id tensor."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if isinstance(prompts, torch.Tensor):
            ids = prompts if prompts.dim() == 2 else prompts[None]
            keep = (
                attention_mask.bool()
                if attention_mask is not None
                else torch.ones_like(ids, dtype=torch.bool)
            )
            return [row[k].tolist() for row, k in zip(ids, keep)]  # strips left or right padding
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise GenerationError("prompts: expected a string, a list of strings or token lists, or a tensor")
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(self._encode_text(p, chat))
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
                out.append(list(p))
            else:
                raise GenerationError(f"prompt {p!r:.60}: expected a string or a list of token ids")
        return out

    def _encode_text(self, text: str, chat: bool | None) -> list[int]:
        if self.tokenizer is None:
            raise GenerationError("this model has no tokenizer: pass token ids instead of strings")
        if not text.strip():
            raise GenerationError("empty prompt: give at least one non-blank character")
        use_chat = getattr(self.tokenizer, "chat_template", None) is not None if chat is None else chat
        if use_chat:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return self.tokenizer.encode(text)

    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(e for e in eos if isinstance(e, int))
        return ids

    # ---- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Any,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: Sequence[str] | str = (),
        ignore_eos: bool = False,
        seed: int | None = None,
        attention_mask: torch.Tensor | None = None,
        chat: bool | None = None,
        stream: Callable[[int, int], None] | None = None,
    ) -> GenerationOutput:
        params = SamplingParams(
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            tuple([stop] if isinstance(stop, str) else stop),
            ignore_eos,
            seed,
        )
        seqs = self.encode(prompts, attention_mask, chat)
        for i, s in enumerate(seqs):
            if not s:
                raise GenerationError(f"prompt {i} is empty: give at least one token")
            if len(s) + max_new_tokens > self.max_seq_len:
                raise GenerationError(
                    f"prompt {i} has {len(s)} tokens; with max_new_tokens={max_new_tokens} it needs "
                    f"{len(s) + max_new_tokens} positions but runtime.max_seq_len is {self.max_seq_len}"
                )
        cap = self.batch_buckets[-1]
        group = self.speculator.generate_group if self.speculator else self._generate_group
        before = dataclasses.replace(self.speculator.stats) if self.speculator else None
        outs = [group(seqs[i : i + cap], params, stream, i) for i in range(0, len(seqs), cap)]
        tokens = [t for o in outs for t in o[0]]
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        ttft, decode_s, steps = outs[0][1], sum(o[2] for o in outs), sum(o[3] for o in outs)
        result = GenerationOutput(tokens, texts, [len(s) for s in seqs], ttft, decode_s, steps)
        if self.speculator:  # MBU's bytes-per-token model assumes one forward per token: not reported
            result.speculative = self.speculator.stats.since(before).as_dict()
        elif steps and len(seqs) == 1:
            result.mbu = self.decode_mbu(result.decode_tok_s, len(seqs[0]) + steps / 2)
        return result

    def decode_mbu(self, steps_per_s: float, context_len: float, batch: int = 1) -> float:
        if self.bandwidth is None:  # measured once; the weights' byte count is fixed after optimize()
            self.bandwidth = measure_read_bandwidth(str(self.device.type))
            stored = (
                cpu_kernels.coded_bytes if self.device.type == "cpu" and cpu_kernels.codes_in_use() else None
            )
            self.weight_bytes = weight_bytes_per_token(self.model, stored)  # coded copies stream fewer
        per_step = self.weight_bytes + batch * kv_bytes_per_token(self.model.config, context_len, self.dtype)
        return mbu(per_step, steps_per_s, self.bandwidth)

    def _generate_group(self, seqs: list[list[int]], params: SamplingParams, stream, offset: int):
        t0 = time.perf_counter()
        n = len(seqs)
        bsz = bucket_for(n, self.batch_buckets)
        lens = [len(s) for s in seqs] + [1] * (bsz - n)
        rows = seqs + [[0]] * (bsz - n)
        gens = [
            None if params.seed is None else torch.Generator().manual_seed(params.seed + offset + i)
            for i in range(n)
        ]
        logits = self.prefill(rows, lens)
        new_tok = sample(logits, [params] * n, gens)
        ttft = time.perf_counter() - t0
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        eos = set() if params.ignore_eos else self.eos_ids()
        pos = torch.tensor(lens, dtype=torch.long, device=self.device)
        steps, t1 = 0, time.perf_counter()
        for step in range(params.max_new_tokens):
            toks = new_tok.tolist()
            for i in range(n):
                if done[i]:
                    continue
                if toks[i] in eos:
                    done[i] = True
                    continue
                out[i].append(toks[i])
                if stream is not None:
                    stream(offset + i, toks[i])
                if len(out[i]) >= params.max_new_tokens or self.hit_stop(out[i], params.stop):
                    done[i] = True
            if all(done) or step == params.max_new_tokens - 1:
                break
            logits = self.step(new_tok[:, None], (pos + step)[:, None], torch.zeros_like(pos))
            new_tok = sample(logits, [params] * n, gens)
            steps += 1
        decode_s = time.perf_counter() - t1
        if params.stop and self.tokenizer is not None:
            out = [self._trim_stop(o, params.stop) for o in out]
        return out, ttft, decode_s, steps

    def prefill(self, rows: list[list[int]], lens: list[int], chunk_fn=None) -> torch.Tensor:
        """Fill cache rows 0..B-1 with ``rows`` (bucket-padded batch); logits after each row's last token.

        ``chunk_fn`` replaces ``prefill_chunk`` (the speculative runtime also feeds its drafter)."""
        chunk_fn = chunk_fn or self.prefill_chunk
        longest = max(lens)
        chunk = bucket_for(longest, self.prefill_buckets)
        logits = None
        for start in range(0, longest, chunk):
            out = chunk_fn(rows, lens, start, min(chunk, longest - start))
            ends_here = torch.tensor([start <= n - 1 < start + chunk for n in lens], device=out.device)
            logits = out if logits is None else torch.where(ends_here[:, None], out, logits)
        return logits

    def prefill_chunk(
        self,
        rows: list[list[int]],
        lens: list[int],
        start: int,
        count: int,
        cache_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run tokens [start, start + count) of each row (padded to a prefill bucket) through the model."""
        ids, pos, last = self.prefill_inputs(rows, lens, start, count)
        return self.step(ids, pos, last, cache_rows, self.prefill_keys(start, ids.shape[1]))

    def prefill_keys(self, start: int, width: int) -> torch.Tensor | None:
        """Key positions a dynamic-length prefill chunk reads: slots [0, start + width), not the whole row.

        Positions past the chunk are masked anyway; reading only the prefix skips gathering (engine rows)
        and attending over the empty rest of the cache. The length is a second symbolic size of the one
        prefill graph. None (all slots) for static buckets (no per-start graphs) and sharded caches."""
        if not self.dynamic_prefill or width < 2:
            return None
        keys = self.cache.prefix_keys(min(start + width, self.max_seq_len))
        if keys is not None:
            torch._dynamo.maybe_mark_dynamic(keys, 0)
        return keys

    def prefill_inputs(
        self, rows: list[list[int]], lens: list[int], start: int, count: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, pos, last) on the device for one prefill chunk, lengths marked dynamic when prefill is."""
        bsz = len(rows)
        width = count if self.dynamic_prefill else bucket_for(count, self.prefill_buckets)
        ids = torch.zeros(bsz, width, dtype=torch.long)
        for b, r in enumerate(rows):
            piece = r[start : start + min(width, count)]
            ids[b, : len(piece)] = torch.tensor(piece, dtype=torch.long)
        pos = (torch.arange(width) + start).clamp(max=self.max_seq_len - 1).expand(bsz, width).contiguous()
        last = torch.tensor([min(max(n - 1 - start, 0), width - 1) for n in lens])
        ids, pos = ids.to(self.device), pos.to(self.device)
        if self.dynamic_prefill and width > 1:
            for t in (ids, pos):  # one graph for every chunk length in [2, largest bucket]
                # a hint, not a constraint: code that guards on the length (DTensor under TP guards
                # T >= 3) gets its own graph for the excluded lengths instead of an error
                torch._dynamo.maybe_mark_dynamic(t, 1)
        return ids, pos, last.to(self.device)

    def hit_stop(self, toks: list[int], stop: tuple[str, ...]) -> bool:
        if not stop or self.tokenizer is None:
            return False
        tail = self.tokenizer.decode(toks[-16:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    def _trim_stop(self, toks: list[int], stop: tuple[str, ...]) -> list[int]:
        """Drop the tokens that complete a stop string (the stop text is not part of the output)."""
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        if not any(s in text for s in stop):
            return toks
        while toks and any(s in self.tokenizer.decode(toks, skip_special_tokens=True) for s in stop):
            toks = toks[:-1]
        return toks
