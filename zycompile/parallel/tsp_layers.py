"""TSP's math for one llama-family layer: prefill (tokens split over the ranks) and decode (weights stay).

Every function takes this rank's *local* weight shards (plain tensors: the callers pass
``DTensor.to_local()``) and issues functional collectives (``torch.distributed._functional_collectives``),
so Dynamo captures the collectives in the step's graph and aot_eager / Inductor lower them.

Prefill, rank r of D, local tokens ``x [B, n, H]`` (zigzag chunks r and 2D-1-r, ``n = 2c``):

- q/k/v: the packed ``[Wq_j; Wk_j; Wv_j]`` shard of rank j is broadcast (j = 0..D-1) and applied to
  the local tokens as one GEMM: D broadcasts give every head for this rank's tokens (the next shard's
  broadcast is issued before the current one is used, so it overlaps the GEMM).
- K/V of the chunk: one all-gather (keys in rank-major order, their positions computed locally);
  local queries attend causally by position. Chunks after the first (long prompts) all-gather the
  cache slices instead: the earlier positions live there.
- o_proj: the ``Wo[:, cols_j]`` shards are broadcast likewise (D broadcasts).
- MLP: ``(gate_j, up_j, down_j^T)`` travel around the ring, one point-to-point shift per step
  (``permute_tensor``, D-1 steps); each rank sums ``down_j(act(gate_j x) * up_j x)`` for its own
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
from zycompile.runtime.sharded_kv_cache import NEVER


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


def prefill_attention(
    ring: Ring, lay, x: torch.Tensor, cos, sin, qpos, kpos, cache, layer: int, past_kpos
) -> torch.Tensor:
    """Attention block for the local tokens ``x [B, n, H]`` (already normed).

    ``qpos [B, n]``: the local queries' positions; ``kpos [B, D*n]``: the gathered keys' positions
    (``NEVER`` for padding, which is neither attended nor cached). ``past_kpos`` (chunks after the
    first): the key position of every slot of every rank's cache slice, in rank order.
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
    qd, kd = lay.q_rows // ring.world, lay.kv_rows // ring.world  # one shard's rows
    split = [p.split([qd, kd, kd], dim=-1) for p in parts]
    q = heads(torch.cat([s[0] for s in split], -1), lay.head_dim, lay.q_norm)
    k = heads(torch.cat([s[1] for s in split], -1), lay.head_dim, lay.k_norm)
    v = heads(torch.cat([s[2] for s in split], -1), lay.head_dim, None)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    kv = ring.gather(torch.stack([k, v]))  # [D, 2, B, Hkv, n, d]
    b, hkv, n, d = k.shape
    kv = kv.permute(1, 2, 3, 0, 4, 5).reshape(2, b, hkv, ring.world * n, d)
    keys, values, key_pos = kv[0], kv[1], kpos
    if cache is not None:
        write_kv(cache, layer, keys, values, kpos)
        if past_kpos is not None:  # earlier chunks live in the cache slices: attend over all of them instead
            kc, vc = cache_rows(cache, layer, b)
            keys = ring.gather(kc).permute(1, 2, 0, 3, 4).flatten(2, 3)
            values = ring.gather(vc).permute(1, 2, 0, 3, 4).flatten(2, 3)
            key_pos = past_kpos.expand(b, -1)
    mask = (key_pos[:, None, :] <= qpos[:, :, None])[:, None]  # [B, 1, n, keys]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=lay.scale, enable_gqa=True)
    out = out.transpose(1, 2).reshape(b, n, -1)
    # o_proj: Wo[:, cols_j] of rank j times this rank's attention output columns cols_j
    wo = lay.wo.to_local()
    nxt, acc = ring.broadcast(wo, 0), None
    cols = out.split(wo.shape[1], dim=-1)
    for j in range(ring.world):
        cur = nxt
        if j + 1 < ring.world:
            nxt = ring.broadcast(wo, j + 1)
        y = F.linear(cols[j], cur)
        acc = y if acc is None else acc + y
    return acc if lay.bo is None else acc + lay.bo


def prefill_mlp(ring: Ring, lay, x: torch.Tensor, act) -> torch.Tensor:
    """Gated MLP for the local tokens: the packed (gate, up, down^T) shards go once around the ring."""
    cur, acc = lay.mlp_packed(), None
    for s in range(ring.world):
        nxt = ring.shift(cur) if s + 1 < ring.world else None  # next shard moves while this one computes
        gate, up = F.linear(x, cur[:2].flatten(0, 1)).chunk(2, dim=-1)  # gate/up: one GEMM
        y = F.linear(act(gate) * up, cur[2].t())
        acc = y if acc is None else acc + y
        cur = nxt
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
    mask = (cache.key_positions[None, None, :] <= pos[:, :, None])[:, None]
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
