"""TSP's math for one llama-family layer: prefill (tokens split over the ranks) and decode (weights stay).

Every function takes this rank's *local* weight shards (plain tensors: the callers pass
``DTensor.to_local()``) and issues functional collectives (``torch.distributed._functional_collectives``),
so Dynamo captures the collectives in the step's graph and aot_eager / Inductor lower them.

Prefill, rank r of D, local tokens ``x [B, n, H]`` (zigzag chunks r and 2D-1-r, ``n = 2c``):

- q/k/v: the packed ``[Wq_j; Wk_j; Wv_j]`` shard of rank j is broadcast (j = 0..D-1) and applied to
  the local tokens as one GEMM: D broadcasts give every head for this rank's tokens (the next shard's
  broadcast is issued before the current one is used, so it overlaps the GEMM).
- K/V of the chunk: one all-gather (rank-major: rank j's zigzag chunks j and 2D-1-j). Each local
  query chunk attends the earlier key chunks whole and its own causally, one flash call per key chunk
  (views of the gathered buffer, GQA without expanding K/V), merged by log-sum-exp: no ``[n x D*n]``
  mask. Chunks after the first (long prompts) also all-gather the cache slices, attended per rank
  with a key-only mask (positions before the chunk) and merged the same way.
- o_proj: the ``Wo[:, cols_j]`` shards are broadcast likewise (D broadcasts).
- MLP: ``(gate_j, up_j, down_j^T)`` travel around the ring in ``MLP_PIECES`` blocks of intermediate
  rows, one point-to-point shift per block and step (``permute_tensor``, D-1 steps); each rank sums ``down_j(act(gate_j x) * up_j x)`` for its own
  tokens, gate/up as one GEMM. No all-reduce: the full sum is built where the tokens are.

Decode (one token per row: fewer tokens than ranks) keeps the same shards stationary, TP-style:
the packed q/k/v shard (one GEMM) + one all-gather of the heads, tree attention over the
sequence-sharded cache (2 all-reduces), o / down row shards + one all-reduce each (gate/up one GEMM).

The packed shards are TSPLayer's storage (the weight parameters are views of them): projections
are fused per shard by construction, which is why the ``fuse_projections`` pass is not run here.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F

import zycompile.ops.tree_attention  # noqa: F401  (registers the decode attention ops)
from zycompile.ops.attention import position_mask
from zycompile.ops.tree_attention import attention_lse, merge_online
from zycompile.runtime.sharded_kv_cache import NEVER

# The prefill MLP ring moves each weight shard in this many blocks of intermediate rows: per rank, one
# shard plus one block in flight instead of two shards (the double buffer of an overlapped ring step).
MLP_PIECES = 2


@dataclasses.dataclass(frozen=True)
class Ring:
    """The mesh axis: world size, this rank, the process group (and its name for our custom ops)."""

    world: int
    rank: int
    group: object
    group_name: str

    def shift(self, t: torch.Tensor) -> torch.Tensor:
        """Send ``t`` to rank r+1 and receive rank r-1's (one point-to-point ring step)."""
        # permute_tensor splits dim 0 by numel, so it moves flat tensors only
        dst = [(i + 1) % self.world for i in range(self.world)]
        return fc.permute_tensor(t.reshape(-1), dst, self.group).view(t.shape)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """All ranks' ``t`` stacked on a new leading dim ``[D, *t.shape]``."""
        return fc.all_gather_single(t.contiguous(), 0, self.group).view(self.world, *t.shape)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return fc.all_reduce(t, "sum", self.group)

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        return fc.broadcast(t.contiguous(), src, self.group)


def zigzag(tokens: int, world: int, rank: int, device=None) -> torch.Tensor:
    """Indices of ``rank``'s tokens among ``tokens`` (a multiple of 2*world): chunks rank and 2*world-1-rank,
    so every rank gets as much early (cheap) as late (expensive) causal work."""
    c = tokens // (2 * world)
    a = torch.arange(c, device=device)
    return torch.cat([a + rank * c, a + (2 * world - 1 - rank) * c])


# ---- shared pieces ---------------------------------------------------------------------------------


def embed_partial(ids: torch.Tensor, w: torch.Tensor, start: int) -> torch.Tensor:
    """Rows of the vocab shard ``w`` (vocabulary ``[start, start + len(w))``) for ``ids``; zero elsewhere."""
    rel = ids - start
    ok = (rel >= 0) & (rel < w.shape[0])
    return F.embedding(rel.clamp(0, w.shape[0] - 1), w).masked_fill(~ok[..., None], 0.0)


def heads(t: torch.Tensor, head_dim: int, norm) -> torch.Tensor:
    """``[B, T, h*d]`` -> ``[B, h, T, d]``, with Qwen3's per-head RMSNorm when the model has one."""
    t = t.view(*t.shape[:2], -1, head_dim)
    return (norm(t) if norm is not None else t).transpose(1, 2)


def write_kv(cache, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
    """Write K/V ``[B, Hkv, T, d]`` at positions ``pos [B, T]``: owned positions to their slot, the rest
    (other ranks' positions, padding at ``NEVER``) to the trash slot."""
    b = k.shape[0]
    rows = torch.arange(b, device=k.device) if cache.rows is None else cache.rows
    trash = torch.full_like(pos, cache.local_len)
    slots = torch.where(pos < cache.global_len, cache.slot_of(pos.clamp(max=cache.global_len - 1)), trash)
    kc, vc = cache.keys[layer], cache.values[layer]
    kc[rows[:, None], :, slots] = k.transpose(1, 2).to(kc.dtype)
    vc[rows[:, None], :, slots] = v.transpose(1, 2).to(vc.dtype)


def cache_rows(cache, layer: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    kc, vc = cache.keys[layer], cache.values[layer]
    if cache.rows is None:
        return kc[:b], vc[:b]
    return kc.index_select(0, cache.rows), vc.index_select(0, cache.rows)


def _linear_packed(x: torch.Tensor, w: torch.Tensor, has_bias: bool) -> torch.Tensor:
    # a packed shard carries its bias as the last column (one broadcast moves both)
    return F.linear(x, w[:, :-1], w[:, -1]) if has_bias else F.linear(x, w)


# ---- prefill: tokens sharded, weights circulate -----------------------------------------------------


def zigzag_attention(
    q: torch.Tensor, kv: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of this rank's zigzag queries over the chunk's gathered keys, no mask built.

    ``q [B, Hq, 2c, d]``: chunks ``rank`` and ``2D-1-rank`` of the padded chunk; ``kv [D, 2, B, Hkv, 2c, d]``:
    rank j's keys/values are chunks j and 2D-1-j. A query chunk g sees chunks ``0..g-1`` whole and itself
    causally: one flash call per key chunk (``is_causal`` on the diagonal, GQA without copying K/V, key
    chunks as views of ``kv``), merged by log-sum-exp. Index order is position order within a prefill
    chunk, and padding sits at its end, so no real query sees a padding key. Returns ``(o, lse)``,
    ``o [B, Hq, 2c, d]`` float32.
    """
    d, c = kv.shape[0], kv.shape[4] // 2

    def chunk(g: int) -> tuple[torch.Tensor, torch.Tensor]:
        j, half = (g, slice(0, c)) if g < d else (2 * d - 1 - g, slice(c, 2 * c))
        return kv[j, 0, :, :, half], kv[j, 1, :, :, half]

    outs, lses = [], []
    for h, g in enumerate((rank, 2 * d - 1 - rank)):
        qh = q[:, :, h * c : (h + 1) * c]
        o, lse = attention_lse(qh, *chunk(g), scale, causal=True)
        for e in range(g):
            o, lse = merge_online(o, lse, *attention_lse(qh, *chunk(e), scale, causal=False))
        outs.append(o.float())
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def past_attention(
    ring: Ring, q, cache, layer: int, scale: float, past_kpos, start
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the chunk's queries over the cached keys of earlier chunks (positions ``< start [B]``),
    one rank's cache slice at a time (gathered; no ``[queries x keys]`` mask). ``(o, lse)`` float32."""
    b = q.shape[0]
    kc, vc = cache_rows(cache, layer, b)
    keys, values = ring.gather(kc), ring.gather(vc)  # [D, B, Hkv, L+1, d]
    o = lse = None
    for j, kpos in enumerate(past_kpos.view(ring.world, -1)):
        seen = kpos[None, :] < start[:, None]  # [B, L+1]
        mask = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill(~seen, float("-inf"))
        oj, lj = attention_lse(q, keys[j], values[j], scale, False, mask[:, None, None])
        lj = lj.masked_fill(~seen.any(-1)[:, None, None], float("-inf"))  # the kernel says 0 when none seen
        o, lse = (oj.float(), lj) if o is None else merge_online(o, lse, oj, lj)
    return o, lse


def prefill_attention(
    ring: Ring, lay, x: torch.Tensor, cos, sin, kpos, cache, layer: int, past
) -> torch.Tensor:
    """Attention block for the local tokens ``x [B, n, H]`` (already normed).

    ``kpos [B, D*n]``: the gathered keys' positions, for the cache writes (``NEVER`` for padding, which
    is never cached). ``past`` (chunks after the first): ``(past_kpos, start)``, the key position of
    every slot of every rank's cache slice in rank order, and each row's first position in this chunk.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    packed = lay.qkv_packed()
    nxt = ring.broadcast(packed, 0)
    parts = []
    for j in range(ring.world):
        cur = nxt
        if j + 1 < ring.world:
            nxt = ring.broadcast(packed, j + 1)  # in flight while shard j multiplies
        parts.append(_linear_packed(x, cur, lay.qkv_bias))
    del cur, nxt  # the received shards: freed before attention
    qd, kd = lay.q_rows // ring.world, lay.kv_rows // ring.world  # one shard's rows
    split = [p.split([qd, kd, kd], dim=-1) for p in parts]
    q = heads(torch.cat([s[0] for s in split], -1), lay.head_dim, lay.q_norm)
    k = heads(torch.cat([s[1] for s in split], -1), lay.head_dim, lay.k_norm)
    v = heads(torch.cat([s[2] for s in split], -1), lay.head_dim, None)
    del parts, split
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    kv = ring.gather(torch.stack([k, v]))  # [D, 2, B, Hkv, n, d]: rank j's tokens, in its zigzag order
    del k, v
    b, n = x.shape[:2]
    if cache is not None:  # one write per rank's block: no [B, Hkv, D*n, d] copy of the gathered K/V
        for j, pj in enumerate(kpos.view(b, ring.world, n).unbind(1)):
            write_kv(cache, layer, kv[j, 0], kv[j, 1], pj)
    out, lse = zigzag_attention(q, kv, ring.rank, lay.scale)
    del kv
    if past is not None:  # earlier chunks live in the cache slices
        out, _ = merge_online(out, lse, *past_attention(ring, q, cache, layer, lay.scale, *past))
    del q, lse
    out = out.to(x.dtype).transpose(1, 2).reshape(b, n, -1)
    # o_proj: Wo[:, cols_j] of rank j times this rank's attention output columns cols_j
    wo = lay.wo.to_local()
    nxt, acc = ring.broadcast(wo, 0), None
    cols = out.split(wo.shape[1], dim=-1)
    for j in range(ring.world):
        cur = nxt
        if j + 1 < ring.world:
            nxt = ring.broadcast(wo, j + 1)
        y = F.linear(cols[j], cur)
        acc = y if acc is None else acc.add_(y)
        del y
    return acc if lay.bo is None else acc + lay.bo


def prefill_mlp(ring: Ring, lay, x: torch.Tensor, act, pieces: int = MLP_PIECES) -> torch.Tensor:
    """Gated MLP for the local tokens: the packed (gate, up, down^T) shards go once around the ring.

    Each shard travels in ``pieces`` blocks of intermediate rows (the MLP is a sum over them), each block
    sent on as soon as it is applied: a rank holds one shard plus one block in flight, not two shards, and
    one block's ``[n, 2I/(D*pieces)]`` intermediate."""
    queue, acc = list(lay.mlp_packed().tensor_split(pieces, dim=1)), None
    for s in range(ring.world):
        for _ in range(pieces):
            cur = queue.pop(0).contiguous()  # a copy only for this rank's own blocks (step 0)
            nxt = ring.shift(cur) if s + 1 < ring.world else None  # moves on while it computes here
            gate, up = F.linear(x, cur[:2].flatten(0, 1)).chunk(2, dim=-1)  # gate/up: one GEMM
            a = act(gate).mul_(up)
            del gate, up  # before the next GEMM: one intermediate alive, not two
            y = F.linear(a, cur[2].t())
            del a, cur
            acc = y if acc is None else acc.add_(y)  # acc is this function's own tensor: sum in place
            del y
            if nxt is not None:  # done with the block: finish its send now, so the sent copy is freed
                queue.append(fc.wait_tensor(nxt))
    return acc


def prefill_embed(ring: Ring, w: torch.Tensor, start: int, ids: torch.Tensor, idx) -> torch.Tensor:
    """Embeddings of this rank's tokens from the vocab-sharded table, as a ring reduce-scatter
    (gloo has no reduce_scatter): D-1 shifts of one token block; block b ends on rank b."""
    r, d = ring.rank, ring.world
    acc = embed_partial(ids[:, idx[(r - 1) % d]], w, start)
    for s in range(1, d):
        acc = ring.shift(acc) + embed_partial(ids[:, idx[(r - 1 - s) % d]], w, start)
    return acc


# ---- decode: weights stationary (TP-style), tokens replicated ---------------------------------------


def decode_attention(ring: Ring, lay, x, cos, sin, pos, cache, layer: int, tree_opts) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, t, _ = x.shape
    loc = _linear_packed(x, lay.qkv_packed(), lay.qkv_bias)  # this rank's q/k/v rows: one GEMM
    g = ring.gather(loc)  # [D, B, T, P]: every rank's slice of q, k and v
    qd, kd = lay.q_rows // ring.world, lay.kv_rows // ring.world
    g = g.permute(1, 2, 0, 3)  # [B, T, D, P]
    q = heads(g[..., :qd].reshape(b, t, -1), lay.head_dim, lay.q_norm)
    k = heads(g[..., qd : qd + kd].reshape(b, t, -1), lay.head_dim, lay.k_norm)
    v = heads(g[..., qd + kd :].reshape(b, t, -1), lay.head_dim, None)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    write_kv(cache, layer, k, v, pos)
    kc, vc = cache_rows(cache, layer, b)
    mask = position_mask(cache.key_positions, pos)
    impl, num_splits, merge = tree_opts
    if impl == "ring":
        out = torch.ops.zycompile.ring_attention(q, kc, vc, mask, lay.scale, ring.group_name)[0]
    else:
        out = torch.ops.zycompile.tree_attention(
            q, kc, vc, mask, lay.scale, ring.group_name, num_splits, merge
        )[0]
    out = out.transpose(1, 2).reshape(b, t, -1)
    wo = lay.wo.to_local()
    cols = out.split(wo.shape[1], dim=-1)[ring.rank]
    y = ring.all_reduce(F.linear(cols, wo))
    return y if lay.bo is None else y + lay.bo


def decode_mlp(ring: Ring, lay, x: torch.Tensor, act) -> torch.Tensor:
    w = lay.mlp_packed()
    gate, up = F.linear(x, w[:2].flatten(0, 1)).chunk(2, dim=-1)  # gate/up: one GEMM
    return ring.all_reduce(F.linear(act(gate) * up, w[2].t()))


def never_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, NEVER)
