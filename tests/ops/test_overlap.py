"""Decomposed all-gather+GEMM and GEMM+reduce-scatter equal the sequential collectives on 1, 2 and 4 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from zycompile.ops import comm_stats
from zycompile.ops.overlap import all_gather_matmul, matmul_reduce_scatter
from zycompile.parallel.local_group import LocalGroup


def both(m: int, k: int, n: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(k, n, generator=torch.Generator().manual_seed(99))
    xs = torch.randn(m * world, k, generator=g)  # this rank's K-slice of a [M, K*world] activation
    with comm_stats.counting() as ag:
        ag_fast = all_gather_matmul(x, w)
    ag_ref = all_gather_matmul(x, w, overlap=False)
    with comm_stats.counting() as rs:
        rs_fast = matmul_reduce_scatter(xs, w)
    rs_ref = matmul_reduce_scatter(xs, w, overlap=False)
    return ag_fast, ag_ref, rs_fast, rs_ref, ag["calls"], rs["calls"]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_overlapped_equals_sequential(world):
    with LocalGroup(world) as g:
        for ag_fast, ag_ref, rs_fast, rs_ref, ag_calls, rs_calls in g.run(both, 6, 16, 10):
            torch.testing.assert_close(ag_fast, ag_ref)
            torch.testing.assert_close(rs_fast, rs_ref, rtol=1e-5, atol=1e-5)
            assert ag_fast.shape == (6 * world, 10) and rs_fast.shape == (6, 10)
            steps = {"send": world - 1} if world > 1 else {}
            assert ag_calls == steps and rs_calls == steps  # world-1 ring steps, each behind a GEMM


def sequence_dim(b: int, t: int, k: int):
    """[B, t, K] shards gathered on dim 1 into two weights with biases; [B, T, k] scattered on dim 1,
    against plain math on the whole tensors (every rank can rebuild them from the seeds)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    xs = [torch.randn(b, t, k, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    ws = [torch.randn(k, n, generator=torch.Generator().manual_seed(90 + n)) for n in (5, 7)]
    bs = [torch.randn(n, generator=torch.Generator().manual_seed(80 + n)) for n in (5, 7)]
    ag = all_gather_matmul(xs[rank], ws, gather_dim=1, biases=bs)
    ag_ref = all_gather_matmul(xs[rank], ws, gather_dim=1, biases=bs, overlap=False)
    want_ag = [torch.cat(xs, 1) @ w + bias for w, bias in zip(ws, bs)]
    parts = [
        torch.randn(b, t * world, k, generator=torch.Generator().manual_seed(50 + r)) for r in range(world)
    ]
    rs = matmul_reduce_scatter(parts[rank], ws[0], scatter_dim=1)
    rs_ref = matmul_reduce_scatter(parts[rank], ws[0], scatter_dim=1, overlap=False)
    want_rs = sum(p @ ws[0] for p in parts)[:, rank * t : (rank + 1) * t]
    return ag, ag_ref, want_ag, rs, rs_ref, want_rs


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_dim_several_weights_and_bias(world):
    with LocalGroup(world) as g:
        for ag, ag_ref, want_ag, rs, rs_ref, want_rs in g.run(sequence_dim, 3, 2, 8):
            for got in (ag, ag_ref):
                for a, w in zip(got, want_ag):
                    torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rs, want_rs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rs_ref, want_rs, rtol=1e-5, atol=1e-5)
