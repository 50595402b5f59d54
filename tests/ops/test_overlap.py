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
