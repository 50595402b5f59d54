"""Drafters for speculative decoding: propose k tokens per row for the target to verify.

Every drafter speaks the same small protocol (``Speculator`` calls it):

    reset_row(row)                      a new sequence starts in cache row ``row``
    prefill_chunk(rows, lens, start, count, cache_rows, hidden)   the target just prefilled a chunk
    propose(ctx, pending, pos, params, generators, k) -> (draft [B, k], q [B, k, V] | None) or (None, None)
    observe(pos, n, next_tok, hidden, k)                          the verify accepted n drafts

``ctx[b]`` holds row b's tokens through the pending one, which sits at ``pos[b]`` and is not in the
cache yet. ``q`` is the distribution each drafted token was drawn from, for sampled rows (rejection
sampling needs it); None means the drafts are deterministic (one-hot q).
"""

from __future__ import annotations

import copy
from array import array
from typing import Any

import torch

from zycompile.errors import RecipeError
from zycompile.ops.attention import position_mask
from zycompile.runtime.step_cache import compile_cached_step


class Drafter:
    needs_hidden = False  # True: the speculator prefills through its hidden-state forward
    confidence: torch.Tensor | None = None  # after propose: [B, k] P(drafts 1..j accepted), if known

    def reset_row(self, row: int) -> None:
        pass

    def prefill_chunk(self, rows, lens, start, count, cache_rows, hidden) -> None:
        pass

    def observe(self, pos, n, next_tok, hidden, k) -> None:
        pass


class NgramDrafter(Drafter):
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (n from
    ``ngram_max`` down to ``ngram_min``) and propose the k tokens that followed it. No model."""

    def __init__(self, ngram_max: int, ngram_min: int):
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def lookup(self, seq: list[int], k: int) -> list[int]:
        # Searched as bytes (4 per token, bytes.rfind in C): a Python scan of a 1000-token context
        # cost ~0.3 ms a round, most rounds finding nothing.
        try:
            data = array("i", seq).tobytes()
        except OverflowError:  # a token id past 2**31: no such vocabulary, but stay exact
            return self._lookup_slow(seq, k)
        for n in range(min(self.ngram_max, len(seq) - 1), self.ngram_min - 1, -1):
            tail = data[-4 * n :]
            end = 4 * (len(seq) - 1)  # a match starts at token len - n - 1 at the latest
            while (at := data.rfind(tail, 0, end)) >= 0:
                if at % 4 == 0:  # whole tokens, not the bytes of two neighbours
                    i = at // 4
                    return seq[i + n : i + n + k]
                end = at + 4 * n - 1  # the next try starts before this one
        return []

    def _lookup_slow(self, seq: list[int], k: int) -> list[int]:
        for n in range(min(self.ngram_max, len(seq) - 1), self.ngram_min - 1, -1):
            tail = seq[-n:]
            for i in range(len(seq) - n - 1, -1, -1):
                if seq[i : i + n] == tail:
                    return seq[i + n : i + n + k]
        return []

    def propose(self, ctx, pending, pos, params, generators, k):
        found = [self.lookup(c, k) for c in ctx]
        if not any(found):
            return None, None
        # The verify is as wide as the longest match (a width the target pays for, per token, on this
        # CPU); rows with a shorter or no match are padded with their last token, mostly rejected.
        width = max(len(f) for f in found)
        draft = [(f + [f[-1] if f else int(p)] * width)[:width] for f, p in zip(found, pending.tolist())]
        return torch.tensor(draft, dtype=torch.long), None


class DraftModelDrafter(Drafter):
    """A smaller causal LM with the target's tokenizer, on its own static cache and compiled steps.

    Its cache lags the target's by one or two tokens after each round (the pending token, and d_k
    when all k were accepted), so one ``[B, 2]`` step catches up and drafts d_1; k-1 decode steps
    draft the rest. ``valid[row]``: the draft cache is right for positions below it."""

    def __init__(self, gen: Any, source: str):
        import zycompile

        recipe = zycompile.load_recipe(
            gen.recipe, {"model.source": source, "speculative.method": "none", "debug.strict": False}
        )
        self.draft = zycompile.optimize(None, recipe).generator()
        self.vocab = gen.model.config.vocab_size
        dvocab = self.draft.model.config.vocab_size
        where = f"{gen.recipe.source_file or '<recipe>'}: speculative.draft_model"
        if dvocab > self.vocab:
            raise RecipeError(
                f"{where}: {source} has {dvocab} tokens, the target {self.vocab}; use a draft "
                "model with the target's tokenizer"
            )
        ta, tb = gen.tokenizer, self.draft.tokenizer
        if ta is not None and tb is not None and ta.get_vocab() != tb.get_vocab():
            raise RecipeError(f"{where}: {source} has a different tokenizer than the target")
        if self.draft.cache.batch < gen.cache.batch or self.draft.max_seq_len < gen.max_seq_len:
            raise RecipeError(f"{where}: the draft cache is smaller than the target's")
        self.valid = [0] * gen.cache.batch
        self.max_pos = gen.max_seq_len - 1

    def reset_row(self, row):
        self.valid[row] = 0

    def prefill_chunk(self, rows, lens, start, count, cache_rows, hidden):
        self.draft.prefill_chunk(rows, lens, start, count, cache_rows)
        for b, r in enumerate(range(len(rows)) if cache_rows is None else cache_rows.tolist()):
            self.valid[r] = min(lens[b], start + count)

    def _logits(self, logits):
        if logits.shape[-1] < self.vocab:  # a draft vocab shorter than the target's (padded embeddings)
            pad = logits.new_full((logits.shape[0], self.vocab - logits.shape[-1]), float("-inf"))
            logits = torch.cat([logits, pad], -1)
        return logits

    def propose(self, ctx, pending, pos, params, generators, k):
        from zycompile.runtime.speculative import pick

        bsz = len(ctx)
        ids = torch.zeros(bsz, 2, dtype=torch.long)
        ipos = torch.zeros(bsz, 2, dtype=torch.long)
        last = torch.zeros(bsz, dtype=torch.long)
        for b in range(bsz):
            p = int(pos[b])
            if len(ctx[b]) != p + 1:  # an idle engine slot: write at the last position, read nothing
                ids[b], ipos[b] = int(pending[b]), self.max_pos
                continue
            first = max(min(self.valid[b], p), p - 1)
            toks = ctx[b][first : p + 1]
            ids[b, : len(toks)] = torch.tensor(toks)
            ipos[b] = torch.tensor([first, first + 1]).clamp(max=self.max_pos)
            last[b] = len(toks) - 1
        dev = self.draft.device
        logits = self._logits(self.draft.step(ids.to(dev), ipos.to(dev), last.to(dev)))
        toks, qs = [], []
        for j in range(k):
            if j:
                step_pos = (pos[:, None] + j).clamp(max=self.max_pos).to(dev)
                logits = self._logits(
                    self.draft.step(toks[-1][:, None], step_pos, torch.zeros_like(last).to(dev))
                )
            tok, q = pick(logits, params, generators)
            toks.append(tok)
            qs.append(q)
        draft = torch.stack(toks, 1)
        q = None if qs[0] is None else torch.stack(qs, 1)
        return draft, q

    def observe(self, pos, n, next_tok, hidden, k):
        for b, (p, a) in enumerate(zip(pos.tolist(), n.tolist())):
            self.valid[b] = p + min(max(k - 1, 0), a) + 1 if k else p + 1


class EarlyExitDrafter(Drafter):
    """Self-speculation (LayerSkip style): the target's first ``exit_layer`` layers, then its final
    norm and LM head. The draft writes the target's own KV cache in those layers (the verify then
    overwrites the drafted positions in every layer), so it needs no cache or prefill of its own."""

    def __init__(self, gen: Any, exit_layer: int):
        where = f"{gen.recipe.source_file or '<recipe>'}: speculative.exit_layer"
        layers = gen.model.config.num_hidden_layers
        if gen.decoder is None or gen.head is None or not gen._can_split_head():
            raise RecipeError(f"{where}: early_exit needs a decoder + linear LM head model")
        if not 1 <= exit_layer < layers:
            raise RecipeError(
                f"{where}: got {exit_layer}; the target has {layers} layers (allowed: 1..{layers - 1})"
            )
        self.gen = gen
        # A shallow copy of the decoder that runs only the first exit_layer layers (HF decoders loop
        # over ``layers[: config.num_hidden_layers]``); the modules, weights and cache are shared.
        self.exit = copy.copy(gen.decoder)
        self.exit.config = copy.deepcopy(gen.decoder.config)
        self.exit.config.num_hidden_layers = exit_layer
        # Saved like the target's steps (no trace in a new process, no per-module guards per call);
        # the recipe hash in the key covers exit_layer.
        self.model, self.recipe, self.device = gen.model, gen.recipe, gen.device
        self.compiled = compile_cached_step(self._step, gen.opt.backend, self, ("ids", "pos"))

    def _step(self, ids, pos):
        gen = self.gen
        cache = gen.cache
        cache.set_step(pos)
        keys = torch.arange(gen.max_seq_len, device=pos.device)
        mask = position_mask(keys, pos)  # [B, 1, T, S]: causal per row
        hidden = self.exit(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{gen.cache_kw: cache}
        ).last_hidden_state
        return gen.head(hidden[:, -1]).float()

    def propose(self, ctx, pending, pos, params, generators, k):
        from zycompile.runtime.speculative import pick

        dev = self.gen.device
        tok, toks, qs = pending.to(dev), [], []
        with torch.no_grad():
            for j in range(k):
                step_pos = (pos[:, None] + j).clamp(max=self.gen.max_seq_len - 1).to(dev)
                tok, q = pick(self.compiled(tok[:, None], step_pos), params, generators)
                toks.append(tok)
                qs.append(q)
        return torch.stack(toks, 1), None if qs[0] is None else torch.stack(qs, 1)


def build_drafter(gen: Any, spec: Any) -> Drafter:
    if spec.method == "ngram":
        return NgramDrafter(spec.ngram_max, spec.ngram_min)
    if spec.method == "draft_model":
        return DraftModelDrafter(gen, spec.draft_model)
    if spec.method == "early_exit":
        return EarlyExitDrafter(gen, spec.exit_layer)
    if spec.method == "eagle":
        from zycompile.runtime.eagle import EagleDrafter

        return EagleDrafter(gen, spec)
    raise RecipeError(f"speculative.method: unknown method {spec.method!r}")
