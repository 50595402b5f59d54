"""Speculative decoding over the static KV cache: draft k tokens cheaply, verify them in one target forward.

One round, for every row of the batch at once:

    drafter.propose  -> d_1..d_k            (ngram lookup, a draft model, early exit, or an EAGLE head)
    verify           -> target logits at the k+1 positions of [pending, d_1..d_k]   (one forward)
    accept           -> n accepted drafts, then one more token (the correction, or a bonus when n == k)

``_verify`` is its own compiled function (``[B, k+1]`` static, one graph per k) that keeps the logits
of every position, where the decode step gathers one. Acceptance is tensor code on the logits' device:
greedy keeps the longest prefix of drafts equal to the target's argmax (so the output is exactly
greedy decoding); sampling is rejection sampling (accept d with min(1, p(d)/q(d)), else draw from
max(0, p - q) normalised), so every token is distributed exactly as the target's ``probabilities``;
a draft tree's sampled rows use the multi-candidate form of it (``DraftTree.accept_sampled``).

Rollback of rejected drafts costs nothing: row b's token at position p lives in cache slot p and a
query at position q attends only to slots <= q, so slots past the last accepted position are
invisible, and the next round writes over them before any query can see them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from zycompile.errors import GenerationError
from zycompile.ops.attention import position_mask
from zycompile.runtime.draft_length import DraftLength
from zycompile.runtime.draft_tree import tree_mask
from zycompile.runtime.generate import bucket_for
from zycompile.runtime.sampling import SamplingParams, probabilities, sample
from zycompile.runtime.step_cache import compile_cached_step, compile_verb

GREEDY = SamplingParams()


@dataclasses.dataclass
class SpecStats:
    """Counters of the decode loop; a "round" is one sequence's share of one target forward."""

    forwards: int = 0  # target forwards of the decode loop (verify, or a plain step when nothing was drafted)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens the rounds added to outputs (accepted drafts + correction/bonus)
    tree_rounds: int = 0  # target forwards that verified a draft tree (drafted = its nodes)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Accepted drafts per target forward per sequence (the bonus/correction token not counted)."""
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0

    def since(self, before: SpecStats) -> SpecStats:
        """The counts added after the snapshot ``before`` (``dataclasses.replace(stats)``)."""
        return SpecStats(*(getattr(self, f.name) - getattr(before, f.name) for f in dataclasses.fields(self)))

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = dataclasses.asdict(self)
        d.update(
            acceptance_rate=self.acceptance_rate,
            mean_accepted=self.mean_accepted,
            tokens_per_forward=self.tokens_per_forward,
        )
        return d

    def summary(self) -> str:
        return format_stats(self.as_dict())


def format_stats(d: dict) -> str:
    return (
        f"acceptance {d['acceptance_rate']:.0%}, mean accepted {d['mean_accepted']:.2f} per verify, "
        f"{d['tokens_per_forward']:.2f} tokens per target forward"
    )


# ---- acceptance (pure tensor functions; tested on their own) -----------------------------------


def accept_greedy(draft: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``draft`` [B, k], target ``logits`` [B, k+1, V] -> (accepted count n [B], next token [B])."""
    target = logits.argmax(-1)
    n = (draft == target[:, :-1]).long().cumprod(1).sum(1)
    return n, target.gather(1, n[:, None])[:, 0]


def accept_rejection(
    draft: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    u: torch.Tensor,
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling. ``q`` [B, k, V]: the draft distributions d was drawn from (one-hot for a
    deterministic drafter); ``p`` [B, k+1, V]: the target's; ``u`` [B, k] uniform in [0, 1)."""
    bsz, k = draft.shape
    pd = p[:, :k].gather(-1, draft[..., None])[..., 0]
    qd = q.gather(-1, draft[..., None])[..., 0]
    n = (u * qd < pd).long().cumprod(1).sum(1)  # u < p/q: accepted with probability min(1, p/q)
    idx = n[:, None, None].expand(bsz, 1, p.shape[-1])
    p_n = p.gather(1, idx)[:, 0]
    q_n = torch.cat([q, torch.zeros_like(q[:, :1])], 1).gather(1, idx)[:, 0]  # n == k: bonus from p
    resid = (p_n - q_n).clamp_min(0)
    mass = resid.sum(-1, keepdim=True)
    resid = torch.where(mass > 0, resid / mass.clamp_min(1e-30), p_n)
    nxt = torch.stack([torch.multinomial(resid[b], 1, generator=generators[b])[0] for b in range(bsz)])
    return n, nxt


def accept(
    draft: torch.Tensor,
    q: torch.Tensor | None,
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy rows take the argmax prefix; sampled rows are rejection-sampled with their own params."""
    n, nxt = accept_greedy(draft, logits)
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if rows:
        k, vocab = draft.shape[1], logits.shape[-1]
        sel = torch.tensor(rows, device=draft.device)
        p = torch.stack([probabilities(logits[b], params[b]) for b in rows])
        qs = (
            q[sel]
            if q is not None
            else torch.nn.functional.one_hot(draft[sel], vocab).to(p.dtype)  # deterministic drafts
        )
        u = torch.stack([torch.rand(k, generator=generators[b]) for b in rows]).to(p.device)
        ns, nx = accept_rejection(draft[sel], qs, p, u, [generators[b] for b in rows])
        n[sel], nxt[sel] = ns, nx
    return n, nxt


def pick(
    logits: torch.Tensor, params: list[SamplingParams], generators: list
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A draft token per row and, for sampled rows, the distribution it came from ([B, V], else None)."""
    tok = logits.argmax(-1)
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if not rows:
        return tok, None
    q = torch.zeros_like(logits, dtype=torch.float32)
    for b in rows:
        q[b] = probabilities(logits[b], params[b])
        tok[b] = torch.multinomial(q[b], 1, generator=generators[b])[0]
    return tok, q


# ---- the speculator ----------------------------------------------------------------------------


class Speculator:
    """Owns the drafter, the compiled verify function and the metrics of one Generator."""

    def __init__(self, gen: Any, spec: Any):
        from zycompile.runtime.drafters import build_drafter

        self.gen, self.spec = gen, spec
        self.k = spec.num_tokens
        self.stats = SpecStats()
        # Saved to disk like the Generator's steps (a new process loads its verify graphs, no trace);
        # the step cache keys them by this owner's model and recipe.
        self.model, self.recipe, self.device = gen.model, gen.recipe, gen.device
        self.compiled_forward = compile_cached_step(
            self._forward, gen.opt.backend, self, ("ids", "pos", "last", "rows", "keys", "tree")
        )
        self.seen_shapes: set[tuple] = set()
        self.drafter = build_drafter(gen, spec)
        # Verify widths of draft trees (speculative.tree): the head's tree through each level (a tree
        # cut short by draft_confidence verifies the levels it drafted), and a prompt-lookup run
        # beside the head's best first token; a smaller tree pads to the next (one graph per width
        # and batch bucket).
        self.tree_widths = (
            sorted(
                {1 + sum(spec.tree[:d]) for d in range(1, len(spec.tree) + 1)}
                | {2 + spec.lookup_tokens if spec.lookup_tokens else 1}
            )
            if spec.tree and hasattr(self.drafter, "propose_tree") and gen.cache.can_move_rows
            else []
        )
        self.length = (
            DraftLength(spec.num_tokens, allow_plain=not self.drafter.needs_hidden)
            if spec.cost_aware
            else None
        )

    # ---- compiled target forward: logits at every position (verify) or at ``last`` (prefill) ----

    def _forward(self, ids, pos, last=None, rows=None, keys=None, tree=None):
        gen = self.gen
        cache = gen.cache
        if tree is None:
            cache.set_step(pos, rows, keys)
        else:  # a draft tree (draft_tree.py): pos = RoPE positions; its nodes fill the block's slots in order
            block = torch.arange(ids.shape[1], device=pos.device)
            cache.set_step((pos[:, :1] + block).clamp(max=gen.max_seq_len - 1), rows, keys)
        keys = torch.arange(gen.max_seq_len, device=pos.device) if keys is None else keys
        # [B, 1, T, S]: causal per row, or each tree node over the context and its own ancestors
        mask = position_mask(keys, pos) if tree is None else tree_mask(keys, pos[:, 0], tree)
        kwargs = {gen.cache_kw: cache, "attention_mask": mask, "position_ids": pos, "use_cache": True}
        if gen._can_split_head():
            hidden = gen.decoder(input_ids=ids, **kwargs).last_hidden_state
            sel = hidden if last is None else hidden[torch.arange(ids.shape[0], device=ids.device), last]
            return gen.head(sel).float(), hidden
        out = gen.model(input_ids=ids, output_hidden_states=True, **kwargs)
        logits = (
            out.logits if last is None else out.logits[torch.arange(ids.shape[0], device=ids.device), last]
        )
        return logits.float(), out.hidden_states[-1]

    def forward(self, ids, pos, last=None, rows=None, keys=None, tree=None):
        dyn = last is not None and self.gen.dynamic_prefill and ids.shape[1] > 1  # one symbolic-length graph
        key = (ids.shape[0], "dyn" if dyn else ids.shape[1], last is None, rows is None, tree is None)
        if key not in self.seen_shapes:
            self.seen_shapes.add(key)
            if self.gen.on_compile:
                what = (
                    "prefill graph (hidden)"
                    if last is not None
                    else f"verify graph for k={ids.shape[1] - 1}"
                    if tree is None
                    else f"tree verify graph for {ids.shape[1] - 1} nodes"
                )
                verb = compile_verb(self.compiled_forward, ids, pos, last, rows, keys, tree)
                self.gen.on_compile(f"{verb} {what}, batch {ids.shape[0]} x {ids.shape[1]} tokens")
        with torch.no_grad():
            return self.compiled_forward(ids, pos, last, rows, keys, tree)

    # ---- prefill: the target's, plus what the drafter keeps of the prompt ----------------------

    def prefill_chunk(self, rows, lens, start, count, cache_rows=None) -> torch.Tensor:
        gen = self.gen
        bsz = len(rows)
        if start == 0:
            reset = range(bsz) if cache_rows is None else cache_rows.tolist()
            for r in reset:
                self.drafter.reset_row(r)
        if not self.drafter.needs_hidden:
            logits = gen.prefill_chunk(rows, lens, start, count, cache_rows)
            self.drafter.prefill_chunk(rows, lens, start, count, cache_rows, None)
            return logits
        # Same inputs as Generator.prefill_chunk, through the forward that also returns hidden states.
        ids, pos, last = gen.prefill_inputs(rows, lens, start, count)
        logits, hidden = self.forward(ids, pos, last, cache_rows, gen.prefill_keys(start, ids.shape[1]))
        self.drafter.prefill_chunk(rows, lens, start, count, cache_rows, hidden)
        return logits

    def prefill(self, rows, lens) -> torch.Tensor:
        return self.gen.prefill(rows, lens, chunk_fn=self.prefill_chunk)

    # ---- one round ------------------------------------------------------------------------------

    def round(
        self,
        ctx: list[list[int]],
        pending: torch.Tensor,
        pos: torch.Tensor,
        params: list[SamplingParams],
        generators: list,
        active: list[bool],
    ) -> list[list[int]]:
        """One draft + verify for every row; ``ctx[b]`` is row b's tokens through the pending one (at
        ``pos[b]``). Returns the tokens each row gains (accepted drafts, then the next token)."""
        gen, k = self.gen, self.k
        dev = gen.device
        top = gen.max_seq_len - 1
        if self._tree_fits(pos, params, active):
            return self._tree_round(ctx, pending, pos, active, params, generators)
        draft, q = self.drafter.propose(ctx, pending, pos, params, generators, k)
        if draft is not None and self.length is not None:  # cost-aware: keep the drafts that pay
            conf = self.drafter.confidence
            rows = [b for b in range(len(ctx)) if active[b]] or [0]
            keep = self.length.choose(draft.shape[1], None if conf is None else conf[rows].mean(0))
            draft, q = (None, None) if keep == 0 else (draft[:, :keep], None if q is None else q[:, :keep])
        t0 = time.perf_counter()
        if draft is None:  # nothing worth verifying: a plain decode step (its graph already exists)
            timed = gen.step_key(len(ctx), 1) in gen.seen_shapes  # not its first (compiling) call
            logits = gen.step(pending[:, None].to(dev), pos[:, None].to(dev), torch.zeros_like(pos).to(dev))
            nxt = sample(logits, params, generators)
            n = torch.zeros_like(nxt)
            self.drafter.observe(pos, n, nxt, None, 0)
            k_used = 0
        else:  # the drafter may stop short of k (no match, low confidence): verify what it drafted
            k_used = draft.shape[1]
            timed = (len(ctx), k_used + 1, True, True, True) in self.seen_shapes
            ids = torch.cat([pending[:, None], draft], 1).to(dev)
            vpos = (pos[:, None] + torch.arange(k_used + 1)).clamp(max=top).to(dev)
            logits, hidden = self.forward(ids, vpos)
            n, nxt = accept(draft.to(dev), None if q is None else q.to(dev), logits, params, generators)
            self.drafter.observe(pos, n, nxt, hidden, k_used)
        n_list, nxt_list = n.tolist(), nxt.tolist()
        if self.length is not None:
            if timed:
                self.length.observe_time(k_used, (time.perf_counter() - t0) * 1e3)
            if k_used:
                self.length.observe_accept([n_list[b] for b in range(len(ctx)) if active[b]], k_used)
        out = []
        for b in range(len(ctx)):
            toks = (draft[b, : n_list[b]].tolist() if k_used else []) + [nxt_list[b]]
            out.append(toks)
            if active[b]:
                self.stats.rounds += 1
                self.stats.drafted += k_used
                self.stats.accepted += n_list[b]
        self.stats.forwards += 1
        if self.spec.adaptive and k_used:
            full = all(n_list[b] == k_used for b in range(len(ctx)) if active[b])
            self.k = min(k + 1, self.spec.num_tokens) if full else max(k - 1, self.spec.min_tokens)
        return out

    # ---- a draft tree's round ------------------------------------------------------------------------

    def _tree_fits(self, pos, params, active) -> bool:
        """Whether this round verifies a draft tree: the drafter builds trees, the batch has at most
        ``tree_max_batch`` rows, the cache keeps position p in slot p, and every active row's block fits
        before the cache's end. Greedy rows follow the target's argmax through the tree; with
        ``tree_sampling``, sampled rows accept by multi-candidate rejection sampling
        (``DraftTree.accept_sampled``), else a round with a sampled row verifies a chain."""
        if not self.tree_widths or len(params) > self.spec.tree_max_batch:
            return False
        if not self.spec.tree_sampling and not all(p.greedy for p in params):
            return False
        top = self.gen.max_seq_len - 1
        return all(int(p) + self.tree_widths[-1] - 1 <= top for p, a in zip(pos.tolist(), active) if a)

    def _tree_round(self, ctx, pending, pos, active, params, generators) -> list[list[int]]:
        gen, dev = self.gen, self.gen.device
        tree = self.drafter.propose_tree(ctx, pending, pos)
        nodes = tree.nodes
        width = next(w for w in self.tree_widths if w > max(nodes))
        ids, depth, anc = tree.inputs(pending.tolist(), width)
        logits, hidden = self.forward(ids.to(dev), (pos[:, None] + depth).to(dev), tree=anc.to(dev))
        paths, nxt = tree.accept_greedy(logits.argmax(-1).tolist())
        for b, p in enumerate(params):
            if active[b] and not p.greedy:
                paths[b], nxt[b] = tree.accept_sampled(b, probabilities(logits[b], p), generators[b])
        # The accepted path's K/V to consecutive slots after the pending token's (when it took a branch;
        # idle engine slots keep theirs: nothing reads them, and their block may overhang the cache).
        moves = [
            (b, int(pos[b]) + node, int(pos[b]) + i)
            for b, path in enumerate(paths)
            for i, node in enumerate(path, 1)
            if node != i and active[b]
        ]
        if moves:
            gen.cache.move_slots(*map(list, zip(*moves)))
        # The drafter sees the path as a chain: the hidden states of the pending token and the path.
        longest = max(len(p) for p in paths)
        idx = torch.tensor([[0, *p] + [p[-1] if p else 0] * (longest - len(p)) for p in paths], device=dev)
        n = torch.tensor([len(p) for p in paths])
        path_hidden = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        self.drafter.observe(pos, n, torch.tensor(nxt), path_hidden, longest)
        out = []
        for b, path in enumerate(paths):
            out.append([tree.tokens[b][node - 1] for node in path] + [nxt[b]])
            if active[b]:
                self.stats.rounds += 1
                self.stats.drafted += nodes[b]
                self.stats.accepted += len(path)
        self.stats.forwards += 1
        self.stats.tree_rounds += 1
        return out

    # ---- Generator.generate's loop for one batch group ------------------------------------------

    def generate_group(self, seqs, params: SamplingParams, stream, offset: int):
        gen = self.gen
        t0 = time.perf_counter()
        n = len(seqs)
        bsz = bucket_for(n, gen.batch_buckets)
        lens = [len(s) for s in seqs] + [1] * (bsz - n)
        rows = seqs + [[0]] * (bsz - n)
        gens = [
            None if params.seed is None else torch.Generator().manual_seed(params.seed + offset + i)
            for i in range(n)
        ] + [None] * (bsz - n)
        plist = [params] * n + [GREEDY] * (bsz - n)
        logits = self.prefill(rows, lens)
        pending = sample(logits, plist, gens).cpu()
        ttft = time.perf_counter() - t0
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n + [True] * (bsz - n)
        eos = set() if params.ignore_eos else gen.eos_ids()
        ctx = [list(r) + [int(t)] for r, t in zip(rows, pending)]
        pos = torch.tensor(lens, dtype=torch.long)

        def emit(i: int, tok: int) -> None:
            if tok in eos:
                done[i] = True
                return
            out[i].append(tok)
            if stream is not None:
                stream(offset + i, tok)
            if len(out[i]) >= params.max_new_tokens or gen.hit_stop(out[i], params.stop):
                done[i] = True

        for i in range(n):
            emit(i, int(pending[i]))
        t1 = time.perf_counter()
        while not all(done):
            gained = self.round(ctx, pending, pos, plist, gens, [not d for d in done])
            for i, toks in enumerate(gained):
                for tok in toks:
                    if i < n and not done[i]:
                        emit(i, tok)
                        self.stats.emitted += 1
                ctx[i].extend(toks)
            pending = torch.tensor([c[-1] for c in ctx], dtype=torch.long)
            pos = (pos + torch.tensor([len(g) for g in gained])).clamp(max=gen.max_seq_len - 1)
        decode_s = time.perf_counter() - t1
        if params.stop and gen.tokenizer is not None:
            out = [gen._trim_stop(o, params.stop) for o in out]
        steps = max((len(o) for o in out), default=1) - 1  # tokens after the first, per sequence
        return out, ttft, decode_s, steps


def build_speculator(gen: Any) -> Speculator | None:
    spec = getattr(gen.recipe, "speculative", None)
    if spec is None or spec.method == "none":
        return None
    if spec.max_drafts + 1 > gen.max_seq_len:
        key = (
            "num_tokens"
            if spec.max_drafts == spec.num_tokens
            else "tree"
            if spec.max_drafts == sum(spec.tree)
            else "lookup_tokens"
        )
        raise GenerationError(
            f"speculative.{key}={spec.max_drafts} needs runtime.max_seq_len > {spec.max_drafts}"
        )
    _allow_recompiles(gen, spec)
    return Speculator(gen, spec)


def _allow_recompiles(gen: Any, spec: Any) -> None:
    """Graphs per compiled function: verify per (batch bucket, k), prefill per bucket; a draft model's
    Generator shares ``Generator._step``'s code object (and so Dynamo's per-code limit) with the target."""
    nb, npf = len(gen.batch_buckets), len(gen.prefill_buckets)
    need = 2 * (npf * nb + 2 * nb) + nb * (spec.max_drafts + 2) + 16
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < need:
        setattr(cfg, name, need)
