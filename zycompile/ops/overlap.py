"""FLUX-style communication/computation overlap for sequence-parallel TP, decomposed per rank chunk.

``all_gather_matmul``: rows of X are sharded over the ranks; ``all_gather(X) @ W``. Decomposed as a
ring: while chunk i is multiplied, chunk i+1 is already travelling from the previous rank, so after
the first hop every transfer hides behind a GEMM.

``matmul_reduce_scatter``: every rank holds a K-slice of the product; ``reduce_scatter(X @ W)`` over
rows. Decomposed as a ring: each step multiplies the row block one rank further along, adds the
partial sum received from the previous rank and sends it on, so sends overlap the next block's GEMM.

Both are exact reorderings of the same sums (the reduce-scatter adds partials in ring order).
``overlap=False`` gives the sequential collective-then-GEMM reference. P2P on the default backend
(gloo on CPU); on CUDA PyTorch's symmetric-memory fused ops are the faster path where available.
"""

from __future__ import annotations

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


def all_gather_matmul(x: torch.Tensor, w: torch.Tensor, group=None, overlap: bool = True) -> torch.Tensor:
    """``cat(all_gather(x)) @ w`` for x ``[m, K]`` per rank, w ``[K, N]``; result ``[world*m, N]``."""
    world, rank, nxt, prv = _ring(group)
    m = x.shape[0]
    if not overlap:
        parts = [torch.empty_like(x) for _ in range(world)]
        comm_stats.record("all_gather", x.numel() * x.element_size())
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts) @ w
    out = x.new_empty((world * m, w.shape[1]))
    chunk = x.contiguous()
    for step in range(world):
        src = (rank - step) % world  # the rank whose rows ``chunk`` holds
        reqs, incoming = [], None
        if step < world - 1:
            incoming = torch.empty_like(chunk)
            reqs = _exchange(chunk, incoming, nxt, prv, group)
        torch.mm(chunk, w, out=out[src * m : (src + 1) * m])
        for r in reqs:
            r.wait()
        chunk = incoming
    return out


def matmul_reduce_scatter(x: torch.Tensor, w: torch.Tensor, group=None, overlap: bool = True) -> torch.Tensor:
    """This rank's row block of ``sum over ranks(x @ w)``; x ``[M, k]`` (a K-slice), w ``[k, N]``; M % world == 0."""
    world, rank, nxt, prv = _ring(group)
    rows = x.shape[0] // world
    if not overlap:
        full = x @ w
        comm_stats.record("all_reduce", full.numel() * full.element_size())
        dist.all_reduce(full, group=group)  # gloo has no reduce-scatter: all-reduce, keep our block
        return full[rank * rows : (rank + 1) * rows].contiguous()
    acc, reqs, sent = None, [], None
    for step in range(world):
        blk = (rank - step - 1) % world  # ends at step world-1 with this rank's own block
        part = x[blk * rows : (blk + 1) * rows] @ w  # computed while the previous send is in flight
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
