"""EAGLE-style draft head: one decoder layer that extrapolates the target's own hidden states.

    entry p:  fc([f_p ; embed(x_{p+1})])  ->  one decoder layer (its own 1-layer KV cache)  ->  g_p ≈ f_{p+1}
    draft:    the target's LM head on g_p, restricted to the head's draft vocabulary  ->  x_{p+2}

``f_p`` is the target's last hidden state at position p (after its final norm: the LM head's input);
the embedding and LM head are the target's, frozen. The draft vocabulary (the most frequent tokens of
the training text) keeps the draft's head GEMV a fraction of the target's full one; a token outside
it is never drafted, which costs acceptance, never correctness. ``zycompile train-draft`` trains it
(``zycompile/train_draft.py``).

Drafting after a verify that accepted n of k: the target's features at the n+1 verified positions
become entries (catch-up, one ``[B, n+1]`` forward, n the most any row accepted, whose entry n drafts
d_1), then k-1 one-token forwards feed the head's own prediction g back as the next feature.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zycompile.errors import RecipeError
from zycompile.ops import half_linear
from zycompile.ops.attention import position_mask
from zycompile.runtime.draft_tree import DraftTree
from zycompile.runtime.drafters import Drafter, NgramDrafter
from zycompile.runtime.kv_cache import StaticKVCache
from zycompile.runtime.step_cache import compile_cached_step

HEAD_FORMAT = "zycompile-eagle-1"


class EagleHead(nn.Module):
    def __init__(self, config: Any, layer_cls: type, vocab_ids: torch.Tensor):
        super().__init__()
        hidden = config.hidden_size
        cfg = copy.deepcopy(config)
        cfg.num_hidden_layers = 1
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = layer_cls(cfg, 0)
        self.register_buffer("vocab_ids", vocab_ids.long().clone())
        # transformers renamed the layer's cache argument (past_key_values -> cache)
        self.cache_kw = (
            "cache" if "cache" in inspect.signature(self.layer.forward).parameters else "past_key_values"
        )

    def forward(self, feat, emb, mask, pos, position_embeddings, cache=None):
        x = self.fc(torch.cat([feat, emb.to(feat.dtype)], -1))
        out = self.layer(
            x,
            attention_mask=mask,
            position_ids=pos,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
            **{self.cache_kw: cache},
        )
        return out[0] if isinstance(out, tuple) else out


def save_head(head: EagleHead, path: str | Path, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: (v if k == "vocab_ids" else v.half()).contiguous() for k, v in head.state_dict().items()}
    info = {"format": HEAD_FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=info)


def load_head(path: str | Path, model: Any, dtype: torch.dtype) -> tuple[EagleHead, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        info = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if info.get("format") != HEAD_FORMAT or "vocab_ids" not in tensors:
        raise RecipeError(f"{path}: not a zycompile EAGLE head (train one with `zycompile train-draft`)")
    meta = {k: json.loads(v) for k, v in info.items() if k != "format"}
    decoder = model.get_decoder()
    if (
        meta.get("hidden_size") != model.config.hidden_size
        or meta.get("vocab_size") != model.config.vocab_size
    ):
        raise RecipeError(
            f"{path}: trained for hidden_size {meta.get('hidden_size')}, vocab {meta.get('vocab_size')} "
            f"({meta.get('target')}); this model has {model.config.hidden_size}, {model.config.vocab_size}"
        )
    head = EagleHead(model.config, type(decoder.layers[0]), tensors["vocab_ids"])
    head.load_state_dict({k: v.to(dtype) if k != "vocab_ids" else v for k, v in tensors.items()})
    return head.to(dtype).eval().requires_grad_(False), meta


def layout_like_target(head: EagleHead, recipe: Any) -> None:
    """The weight layout the recipe's passes gave the target (K-major; sibling projections back to
    back), so the same graph passes match the head's graph. Values never change."""
    from zycompile.passes.fuse_projections import fuse_storage
    from zycompile.passes.weight_layout import WeightLayoutPass

    for spec in recipe.passes:
        if spec.name == "weight_layout":
            WeightLayoutPass.prepare(head, spec.options)
        elif spec.name == "fuse_projections":
            for mod in head.modules():
                for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
                    group = [getattr(mod, n, None) for n in names]
                    if all(isinstance(m, nn.Linear) for m in group):
                        fuse_storage([m.weight for m in group])
                        if all(m.bias is not None for m in group):
                            fuse_storage([m.bias for m in group])


def resolve_head_path(recipe: Any) -> Path:
    raw = Path(recipe.speculative.eagle_head)
    candidates = [raw] if raw.is_absolute() else [Path.cwd() / raw]
    if recipe.source_file and not raw.is_absolute():
        candidates.insert(0, Path(recipe.source_file).resolve().parent / raw)
    for c in candidates:
        if c.is_file():
            return c
    where = recipe.source_file or "<recipe>"
    raise RecipeError(
        f"{where}: speculative.eagle_head: file {str(raw)!r} not found (looked in "
        f"{', '.join(str(c.parent) for c in candidates)}); train one with `zycompile train-draft`"
    )


class EagleDrafter(Drafter):
    needs_hidden = True

    def __init__(self, gen: Any, spec: Any):
        if not gen._can_split_head():
            raise RecipeError("speculative.method 'eagle' needs a decoder + linear LM head model")
        self.gen = gen
        path = resolve_head_path(gen.recipe)
        self.head, self.meta = load_head(path, gen.model, gen.dtype)
        self.head.to(gen.device)
        layout_like_target(self.head, gen.recipe)
        with torch.no_grad():
            w = gen.head.weight[self.head.vocab_ids.to(gen.device)]
        self.w_draft = w.t().contiguous().t()  # [Vd, H], K-major like weight_layout's linears
        # fp16 panel copies for the head's GEMMs (small_gemm reads the marks): half a call's bytes
        if spec.head_weights == "float16":
            half_linear.mark([*self.head.parameters(), self.w_draft])
        text = gen.model.config
        self.cache = StaticKVCache(
            1,
            gen.cache.batch,
            getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            gen.max_seq_len,
            getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            gen.dtype,
            gen.device,
        )
        # prompt lookup beside the head (speculative.lookup_tokens): repeated text drafts from itself
        self.lookup = NgramDrafter(spec.ngram_max, spec.ngram_min) if spec.lookup_tokens else None
        self.lookup_tokens = spec.lookup_tokens
        self.lookup_rounds = 0  # rounds that verified lookup drafts for some row
        self.width = spec.max_drafts + 1
        rows = gen.cache.batch
        self.feat = torch.zeros(rows, self.width, text.hidden_size, dtype=gen.dtype, device=gen.device)
        self.start = [0] * rows  # entries start..pos-1 are pending (features known, not yet in the cache)
        # Saved to disk like the target's steps: a new process loads the head's graphs instead of
        # tracing them, and a call checks only its arguments' guards, not Dynamo's. The key adds the
        # head file, whose weights the target's parameters do not cover.
        self.model, self.recipe, self.device = gen.model, gen.recipe, gen.device
        self.step_cache_extra = hashlib.sha256(path.read_bytes()).hexdigest()
        self.compiled = compile_cached_step(
            self._draft, gen.opt.backend, self, ("feat", "ids", "pos", "last", "rows")
        )
        self.max_pos = gen.max_seq_len - 1
        self.threshold = spec.draft_confidence
        self.tree = tuple(spec.tree)

    def _draft(self, feat, ids, pos, last, rows=None):
        gen = self.gen
        cache = self.cache
        cache.set_step(pos, rows)
        keys = torch.arange(gen.max_seq_len, device=pos.device)
        mask = position_mask(keys, pos)  # [B, 1, T, S]: causal per row
        emb = gen.decoder.embed_tokens(ids)
        pe = gen.decoder.rotary_emb(emb, pos)
        g = self.head(feat, emb, mask, pos, pe, cache)
        g = g[torch.arange(ids.shape[0], device=ids.device), last]
        return torch.nn.functional.linear(g, self.w_draft).float(), g

    def draft(self, feat, ids, pos, last, rows=None):
        with torch.no_grad():
            return self.compiled(feat, ids, pos, last, rows)

    def reset_row(self, row):
        self.start[row] = 0

    def prefill_chunk(self, rows, lens, start, count, cache_rows, hidden):
        """Entries of the prompt: (f_p, x_{p+1}) for p < len-1; the last prompt feature waits for the
        first generated token, so it becomes the first pending entry."""
        gen = self.gen
        bsz, width = len(rows), bucket(count, gen.prefill_buckets)
        feat = torch.zeros(bsz, width, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        feat[:, : hidden.shape[1]] = hidden[:, :width]
        ids = torch.zeros(bsz, width, dtype=torch.long)
        for b, r in enumerate(rows):
            nxt = r[start + 1 : start + 1 + width]
            ids[b, : len(nxt)] = torch.tensor(nxt, dtype=torch.long)
        pos = (torch.arange(width) + start).clamp(max=self.max_pos).expand(bsz, width).contiguous()
        dev = gen.device
        zero = torch.zeros(bsz, dtype=torch.long, device=dev)
        self.draft(feat, ids.to(dev), pos.to(dev), zero, cache_rows)
        for b, row in enumerate(range(bsz) if cache_rows is None else cache_rows.tolist()):
            end = lens[b] - 1
            if start <= end < start + count:
                self.feat[row, 0] = hidden[b, end - start]
                self.start[row] = end

    def _catch_up(self, ctx, pos):
        """The head's first call of a round: it takes in the entries the last verify left pending and
        returns the logits (draft vocabulary) and feature of d_1's prediction."""
        dev = self.gen.device
        bsz = len(ctx)
        # Catch-up over only as many entries as some row has pending (accepted drafts + 1): one small
        # head graph per width, and the one-token calls below share the width-1 graph.
        pending_entries = [int(pos[b]) - self.start[b] for b in range(bsz) if len(ctx[b]) == int(pos[b]) + 1]
        width = max([n for n in pending_entries if 0 < n <= self.width], default=1)
        ids = torch.zeros(bsz, width, dtype=torch.long)
        epos = torch.full((bsz, width), self.max_pos, dtype=torch.long)
        last = torch.zeros(bsz, dtype=torch.long)
        for b in range(bsz):
            p, s = int(pos[b]), self.start[b]
            if len(ctx[b]) != p + 1 or not 0 < p - s <= width:  # idle engine slot
                continue
            nxt = ctx[b][s + 1 : p + 1]
            ids[b, : len(nxt)] = torch.tensor(nxt, dtype=torch.long)
            epos[b] = (torch.arange(width) + s).clamp(max=self.max_pos)
            last[b] = p - s - 1
        return self.draft(self.feat[:bsz, :width], ids.to(dev), epos.to(dev), last.to(dev))

    def _next(self, g, tok, pos, j):
        """The head's call for draft j + 1, fed its own feature g and draft j (at position pos + j - 1)."""
        step_pos = (pos[:, None] + j - 1).clamp(max=self.max_pos).to(self.gen.device)
        return self.draft(g[:, None], tok[:, None], step_pos, torch.zeros_like(step_pos[:, 0]))

    def propose(self, ctx, pending, pos, params, generators, k):
        from zycompile.runtime.speculative import pick

        gen, dev = self.gen, self.gen.device
        bsz = len(ctx)
        logits, g = self._catch_up(ctx, pos)
        toks, qs, confs = [], [], []
        conf = torch.ones(bsz, device=dev)
        for j in range(k):
            if j:
                logits, g = self._next(g, toks[-1], pos, j)
            sub, q_sub = pick(logits, params, generators)
            # P(draft j and all before it accepted) ~ the product of the head's probabilities: below
            # ``draft_confidence`` a draft costs verify width (and draft calls) for little expected gain.
            conf = conf * torch.softmax(logits, -1).gather(1, sub[:, None])[:, 0]
            low = bool((conf < self.threshold).all())
            if low and j:
                break
            toks.append(self.head.vocab_ids[sub])
            confs.append(conf)
            if q_sub is not None:
                q = torch.zeros(bsz, gen.model.config.vocab_size, device=dev)
                qs.append(q.index_copy_(1, self.head.vocab_ids, q_sub))
            if low:  # every later draft is less likely still: no draft call for it
                break
        self.confidence = torch.stack(confs, 1)
        draft = torch.stack(toks, 1)
        if self.lookup is not None and not qs:
            return self._with_lookup(ctx, pos, draft)
        return draft, torch.stack(qs, 1) if qs else None

    def propose_tree(self, ctx, pending, pos) -> DraftTree:
        """A draft tree (``speculative.tree`` = [w_1, w_2, ...]): the head's w_1 most likely tokens for
        d_1; under the most likely of them its w_2 most likely for d_2; and so on, one head call per
        depth. Where the context repeats (``lookup_tokens``), the row's tree is the prompt-lookup run
        beside the head's best first token instead: every verify position costs ~5% of a step here,
        and the run is worth more than the head's other branches. Greedy rows accept the target's
        argmax path, sampled rows by tree rejection sampling (``DraftTree.accept_sampled``)."""
        bsz = len(ctx)
        paths: list[list[list[int]]] = [[] for _ in range(bsz)]
        logits, g = self._catch_up(ctx, pos)
        best: torch.Tensor | None = None
        conf: torch.Tensor | None = None
        prefix: list[list[int]] = [[] for _ in range(bsz)]
        for depth, count in enumerate(self.tree):
            if depth:
                # Deeper only where the best path so far is likely (``draft_confidence``): a level
                # costs a head call and verify positions, and pays only when its parent is accepted.
                if bool((conf < self.threshold).all()):
                    break
                logits, g = self._next(g, best, pos, depth)
            probs, idx = torch.softmax(logits, -1).topk(count, -1)
            conf = probs[:, 0] if conf is None else conf * probs[:, 0]
            top = self.head.vocab_ids[idx]  # [B, count], most likely first
            for b, cands in enumerate(top.tolist()):
                paths[b].extend(prefix[b] + [c] for c in cands)
                prefix[b] = prefix[b] + [cands[0]]
            best = top[:, 0]
        if self.lookup is not None:
            found = self._lookups(ctx, pos)
            if any(found):
                self.lookup_rounds += 1
                for b, f in enumerate(found):
                    if f:
                        paths[b] = [f, paths[b][0][:1]]
        self.confidence = None
        return DraftTree.from_paths(paths)

    def _lookups(self, ctx, pos) -> list[list[int]]:
        """Per row, the prompt-lookup run that follows the context's repeated tail (idle slots: none)."""
        return [
            self.lookup.lookup(c, self.lookup_tokens) if len(c) == int(p) + 1 else []
            for c, p in zip(ctx, pos.tolist())
        ]

    def _with_lookup(self, ctx, pos, draft):
        """Rows whose context repeats (the lookup's match) draft what followed it, the others keep the
        head's drafts. Only called when every row is greedy: a lookup draft has no distribution for
        rejection sampling. The head's first call still ran: it took in the last round's entries,
        which it needs either way."""
        found = self._lookups(ctx, pos)
        if not any(found):
            return draft, None
        self.lookup_rounds += 1
        width = max(draft.shape[1], max(len(f) for f in found))
        rows = []
        for f, d in zip(found, draft.tolist()):
            r = f or d  # shorter rows repeat their last draft: verified, mostly rejected, never wrong
            rows.append((r + [r[-1]] * width)[:width])
        self.confidence = None  # the head's probabilities say nothing of lookup drafts
        return torch.tensor(rows, dtype=torch.long, device=draft.device), None

    def observe(self, pos, n, next_tok, hidden, k):
        """The verified positions' features (through the last accepted one) are the next entries."""
        if hidden is None:
            return
        for b, (p, a) in enumerate(zip(pos.tolist(), n.tolist())):
            self.feat[b, : a + 1] = hidden[b, : a + 1]
            self.start[b] = p


def bucket(n: int, buckets) -> int:
    return next((b for b in buckets if b >= n), buckets[-1])
