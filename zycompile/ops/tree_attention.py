"""Tree attention: exact attention over a KV cache split along the sequence, and Ring attention.

Every KV part yields a *partial* result — its softmax-normalised output ``o`` and the log-sum-exp
``lse`` of its scores — and the parts merge exactly:

    M = max_i lse_i,   w_i = exp(lse_i - M),   o = sum_i w_i o_i / sum_i w_i,   lse = M + log(sum_i w_i)

Max and sum are associative, so the merge is a log-depth reduction: a stacked max/sum over the
splits of one device (``split_kv_attention``: flash-decoding), or across ranks one MAX all-reduce of
``lse`` plus one SUM all-reduce of the packed ``[w*o, w]`` (``tree_attention``: two collectives per
call whatever the world size). ``ring_attention`` is the baseline: K/V blocks travel around the ring
(p-1 send/recv steps, each overlapped with the partial of the block already here) and are merged
online. All three are custom ops (fake impls included) returning ``(out, lse)``; ``out`` has q's
dtype, ``lse`` is float32 ``[B, Hq, Tq]``.

Shapes: q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, v ``[B, Hkv, Tk, Dv]`` (Dv may differ from D:
MLA), Hq a multiple of Hkv (GQA/MQA without copies); ``mask`` bool (True = attend) or additive,
broadcastable to ``[B, Hq, Tq, Tk]`` and covering the *local* keys. Sharded ops take an explicit
mask: only the caller knows the global positions of its keys (``causal`` is for one device).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zycompile.ops import comm_stats

_TINY = 1e-30  # guards 0/0 where a part has no visible key (its weight is exactly 0 then)


# ---- partials and their merge (plain torch: the CPU path and the reference for kernels) ------------


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one KV part: float32 ``(o [B,Hq,Tq,Dv], lse [B,Hq,Tq])``; lse=-inf if nothing visible."""
    b, hq, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    rep = hq // hkv
    if tk == 0:  # an empty slice (fewer keys than ranks): contributes nothing, weight exp(-inf) = 0
        o = q.new_zeros((b, hq, tq, dv), dtype=torch.float32)
        return o, torch.full((b, hq, tq), float("-inf"), device=q.device)
    # q heads kvh*rep .. kvh*rep+rep-1 share kv head kvh (repeat_interleave order): one batched matmul.
    qg = q.float().reshape(b, hkv, rep * tq, d)
    s = (qg @ k.float().transpose(-1, -2)).mul_(scale).view(b, hq, tq, tk)
    if causal:
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    o = (p.view(b, hkv, rep * tq, tk) @ v.float()).view(b, hq, tq, dv)
    o = o / den.clamp_min(_TINY)
    return o, (m + torch.log(den)).squeeze(-1)


def merge_partials(o: torch.Tensor, lse: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials stacked along ``dim`` (o ``[..., S, ..., Dv]``, lse without the Dv axis)."""
    m = lse.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)
    den = w.sum(dim)
    out = (o * w.unsqueeze(-1)).sum(dim) / den.clamp_min(_TINY).unsqueeze(-1)
    return out, m.squeeze(dim) + torch.log(den)


def merge_pair(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partials (ring attention's online step; one node of the tree)."""
    return merge_partials(torch.stack([o1, o2]), torch.stack([lse1, lse2]))


def merge_online(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_pair`` without stacking (float32 result): for callers that merge many partials of one
    query block in turn and must not hold two copies of it. A part that saw no key (lse -inf) weighs
    nothing, as in ``merge_partials``."""
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    den = w1 + w2
    safe = den.clamp_min(_TINY)
    o = (o1.float() * (w1 / safe).unsqueeze(-1)).add_(o2.float() * (w2 / safe).unsqueeze(-1))
    return o, m + torch.log(den)


def attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, mask=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of q over one KV block with its log-sum-exp: ``(o, lse [B, Hq, Tq] float32)``.

    CPU: the fused flash kernel (GQA without copies, ``causal`` top-left, no score matrix); other
    devices: ``partial_attention`` (materialises the block's scores). ``mask``: additive float."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
    o, lse = partial_attention(q, k, v, mask, scale, causal)
    return o.to(q.dtype), lse


def tree_merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise log-depth merge of a list of partials (what an all-reduce tree does across ranks)."""
    while len(parts) > 1:
        nxt = [merge_pair(*parts[i], *parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        parts = nxt + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


def _out_and_lse_like(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-impl outputs of every op here: out ``[B, Hq, Tq, Dv]`` in q's dtype, lse float32 ``[B, Hq, Tq]``."""
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _split_kv_torch(q, k, v, mask, scale, causal, num_splits):
    tk = k.shape[-2]
    if causal:  # materialise the bottom-right causal mask: it must be split with the keys
        tq = q.shape[-2]
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        mask = (
            keep
            if mask is None
            else (mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf")))
        )
    n = max(1, min(num_splits, tk))
    if n == 1:
        o, lse = partial_attention(q, k, v, mask, scale, False)
    else:
        mask_full = None if mask is None else mask.expand(*mask.shape[:-1], tk)
        ks, vs = k.tensor_split(n, dim=-2), v.tensor_split(n, dim=-2)
        ms = [None] * n if mask_full is None else mask_full.tensor_split(n, dim=-1)
        parts = [partial_attention(q, ki, vi, mi, scale, False) for ki, vi, mi in zip(ks, vs, ms)]
        o, lse = merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    return o.to(q.dtype), lse


# ---- single device: split-KV (flash-decoding) ---------------------------------------------------


@torch.library.custom_op("zycompile::split_kv_attention", mutates_args=())
def split_kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys cut into ``num_splits`` contiguous blocks, a partial per block, merged by max/sum."""
    if q.device.type != "cpu":
        from zycompile.ops import triton_split_kv

        if triton_split_kv.supports(q, k, v, mask, causal):
            return triton_split_kv.split_kv_attention(q, k, v, mask, scale, num_splits)
    return _split_kv_torch(q, k, v, mask, scale, causal, num_splits)


@split_kv_attention.register_fake
def _(q, k, v, mask, scale, causal, num_splits):
    return _out_and_lse_like(q, v)


# ---- across ranks: tree (all-reduce) and ring (point-to-point) ------------------------------------


def _group(name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(name)


@torch.library.custom_op("zycompile::tree_attention", mutates_args=())
def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    group_name: str,
    num_splits: int,
    merge: str = "allreduce",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local partial (split-KV when ``num_splits`` > 1), then the merge across the group.

    ``allreduce``: MAX all-reduce of lse, then one SUM all-reduce of the packed ``[w*o, w]`` (2
    collectives; an NCCL tree all-reduce is log-depth, and the bytes do not grow with the ranks).
    ``allgather``: one all-gather of the packed ``[o, lse]`` and the same max/sum merge locally (1
    collective; W times the bytes, so for decode-sized partials where latency rules).
    """
    o, lse = split_kv_attention(q, k, v, mask, scale, False, num_splits)
    o = o.float()
    group = _group(group_name)
    if merge == "allgather":
        packed = torch.cat([o, lse.unsqueeze(-1)], dim=-1).contiguous()
        parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        comm_stats.record("all_gather", packed.numel() * packed.element_size())
        dist.all_gather(parts, packed, group=group)
        stacked = torch.stack(parts)
        out, lse = merge_partials(stacked[..., :-1], stacked[..., -1])
        return out.to(q.dtype), lse
    if merge != "allreduce":
        raise ValueError(f"tree_attention merge {merge!r}: expected 'allreduce' or 'allgather'")
    m = lse.clone()
    comm_stats.record("all_reduce", m.numel() * m.element_size())
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m).unsqueeze(-1)
    packed = torch.cat([o * w, w], dim=-1)  # numerator and denominator in one round
    comm_stats.record("all_reduce", packed.numel() * packed.element_size())
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    num, den = packed[..., :-1], packed[..., -1:]
    out = (num / den.clamp_min(_TINY)).to(q.dtype)
    return out, m + torch.log(den.squeeze(-1))


@tree_attention.register_fake
def _(q, k, v, mask, scale, group_name, num_splits, merge="allreduce"):
    return _out_and_lse_like(q, v)


@torch.library.custom_op("zycompile::ring_attention", mutates_args=())
def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    group_name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V (and the mask's key columns) circulate p-1 steps; each step's transfer overlaps a partial.

    Every rank must hold blocks of the same shape (a sharded cache pads its slices to equal size).
    """
    group = _group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    send_to = dist.get_global_rank(group, (rank + 1) % world)
    recv_from = dist.get_global_rank(group, (rank - 1) % world)
    if mask is not None:
        mask = mask.expand(*mask.shape[:-1], k.shape[-2])
        # gloo has no bool transport; additive masks travel as they are
        mask = mask.to(torch.uint8) if mask.dtype == torch.bool else mask
    block = [t.contiguous() for t in ((k, v) if mask is None else (k, v, mask))]
    o = lse = None
    for step in range(world):
        reqs, incoming = [], []
        if step < world - 1:  # start moving the block on before computing with it
            incoming = [torch.empty_like(t) for t in block]
            ops = [dist.P2POp(dist.isend, t, send_to, group) for t in block]
            ops += [dist.P2POp(dist.irecv, t, recv_from, group) for t in incoming]
            nbytes = sum(t.numel() * t.element_size() for t in block)
            comm_stats.record("send", nbytes)  # one round: this step's k, v (and mask) to the next rank
            comm_stats.record("recv", nbytes)
            reqs = dist.batch_isend_irecv(ops)
        bm = None if mask is None else (block[2].bool() if block[2].dtype == torch.uint8 else block[2])
        po, plse = partial_attention(q, block[0], block[1], bm, scale, False)
        o, lse = (po, plse) if o is None else merge_pair(o, lse, po, plse)
        for r in reqs:
            r.wait()
        block = incoming
    return o.to(q.dtype), lse


@ring_attention.register_fake
def _(q, k, v, mask, scale, group_name):
    return _out_and_lse_like(q, v)
