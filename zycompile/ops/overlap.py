"""FLUX-style communication/computation overlap for sequence-parallel TP, decomposed per rank chunk.

``all_gather_matmul``: rows of X are sharded over the ranks; ``all_gather(X) @ W``. Decomposed as a
ring: while chunk i is multiplied, chunk i+1 is already travelling from the previous rank, so after
the first hop every transfer hides behind a GEMM.

``matmul_reduce_scatter``: every rank holds a K-slice of the product; ``reduce_scatter(X @ W)`` over
rows. Decomposed as a ring: each step multiplies the row block one rank further along, adds the
partial sum received from the previous rank and sends it on, so sends overlap the next block's GEMM.

Both are exact reorderings of the same sums (the reduce-scatter adds partials in ring order).
``overlap=False`` gives the sequential collective-then-GEMM reference. P2P on the default backend
(gloo on CPU); on CUDA PyTorch's symmetric-memory fused ops are the faster path where available
(``zycompile/ops/overlap_ops.py`` picks). ``gather_dim`` / ``scatter_dim`` name the sequence dim of a
``[B, T, H]`` activation (Shard(1) under TP with sequence parallelism).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from zycompile.ops import comm_stats


def _ring(group):
    group = group or dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world)
    prv = dist.get_global_rank(group, (rank - 1) % world)
    return world, rank, nxt, prv


def _exchange(send: torch.Tensor, recv: torch.Tensor, nxt: int, prv: int, group):
    comm_stats.record("send", send.numel() * send.element_size())
    ops = [dist.P2POp(dist.isend, send, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
    return dist.batch_isend_irecv(ops)


def _mm(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = a @ w (+ bias)``, straight into ``out`` when it is one contiguous slab."""
    if out.is_contiguous():
        a2, o2 = a.reshape(-1, a.shape[-1]), out.view(-1, out.shape[-1])
        if bias is None:
            torch.mm(a2, w, out=o2)
        else:
            torch.addmm(bias, a2, w, out=o2)
    else:
        out.copy_(a @ w if bias is None else torch.addmm(bias, a.reshape(-1, a.shape[-1]), w).view(out.shape))


def all_gather_matmul(
    x: torch.Tensor,
    w: torch.Tensor | Sequence[torch.Tensor],
    group=None,
    overlap: bool = True,
    gather_dim: int = 0,
    biases: Sequence[torch.Tensor] | None = None,
):
    """``cat(all_gather(x), gather_dim) @ w_i (+ bias_i)`` for each weight ``[K, N_i]``; x ``[..., m, ..., K]``.

    One gather feeds every weight (q/k/v share one). Returns a tensor for one weight, a list for a list."""
    ws = [w] if isinstance(w, torch.Tensor) else list(w)
    bs = list(biases) if biases else [None] * len(ws)
    world, rank, nxt, prv = _ring(group)
    m = x.shape[gather_dim]
    full = list(x.shape)
    full[gather_dim] = world * m
    outs = [x.new_empty((*full[:-1], wi.shape[1])) for wi in ws]
    if not overlap:
        gathered = x.new_empty((world * x.shape[0], *x.shape[1:]))
        comm_stats.record("all_gather", x.numel() * x.element_size())
        dist.all_gather_into_tensor(gathered, x.contiguous(), group=group)
        a = torch.cat(gathered.chunk(world), gather_dim) if gather_dim else gathered
        for wi, bi, oi in zip(ws, bs, outs):
            _mm(a, wi, bi, oi)
        return outs[0] if isinstance(w, torch.Tensor) else outs
    chunk = x.contiguous()
    for step in range(world):
        src = (rank - step) % world  # the rank whose rows ``chunk`` holds
        reqs, incoming = [], None
        if step < world - 1:
            incoming = torch.empty_like(chunk)
            reqs = _exchange(chunk, incoming, nxt, prv, group)
        for wi, bi, oi in zip(ws, bs, outs):
            _mm(chunk, wi, bi, oi.narrow(gather_dim, src * m, m))
        for r in reqs:
            r.wait()
        chunk = incoming
    return outs[0] if isinstance(w, torch.Tensor) else outs


def matmul_reduce_scatter(
    x: torch.Tensor, w: torch.Tensor, group=None, overlap: bool = True, scatter_dim: int = 0
) -> torch.Tensor:
    """This rank's block (on ``scatter_dim``) of ``sum over ranks(x @ w)``; x ``[..., M, ..., k]`` (a
    K-slice), w ``[k, N]``; M % world == 0."""
    world, rank, nxt, prv = _ring(group)
    rows = x.shape[scatter_dim] // world
    if not overlap:
        full = x @ w
        out = full.new_empty((*full.shape[:scatter_dim], rows, *full.shape[scatter_dim + 1 :]))
        comm_stats.record("reduce_scatter", full.numel() * full.element_size())
        dist.reduce_scatter(out, [c.contiguous() for c in full.chunk(world, scatter_dim)], group=group)
        return out
    acc, reqs, sent = None, [], None
    for step in range(world):
        blk = (rank - step - 1) % world  # ends at step world-1 with this rank's own block
        part = x.narrow(scatter_dim, blk * rows, rows) @ w  # computed while the previous send is in flight
        for r in reqs:
            r.wait()
        if acc is not None:
            part += acc
        if step == world - 1:
            return part
        acc = torch.empty_like(part)
        sent = part  # keep the send buffer alive until its request completes
        reqs = _exchange(sent, acc, nxt, prv, group)
    raise AssertionError("unreachable")
