"""Tree and ring attention over a KV cache sharded on 1, 2 and 4 gloo ranks equal dense attention.

Hypothesis draws the cases in this process; every rank rebuilds the same inputs from the case's
seed, keeps its own slice of the keys (contiguous or round-robin, lengths not divisible by the world
size, slices padded with garbage keys that the mask hides), runs both ops and reports the result and
the collectives it issued.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zycompile.ops import comm_stats
from zycompile.ops.attention import reference_attention
from zycompile.ops.tree_attention import ring_attention, tree_attention
from zycompile.parallel.local_group import LocalGroup

EXAMPLES_PER_WORLD = 70  # x 3 world sizes = 210 cases


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    batch: int
    kv_heads: int
    rep: int
    head_dim: int
    v_head_dim: int
    tk: int
    tq: int
    causal: bool
    padding: bool
    layout: str
    num_splits: int
    equal_slices: bool  # tree also accepts slices of different lengths; ring needs equal ones


@st.composite
def cases(draw) -> Case:
    head_dim = draw(st.sampled_from([8, 16, 24]))
    tk = draw(st.integers(1, 67))
    return Case(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, 2)),
        kv_heads=draw(st.integers(1, 3)),
        rep=draw(st.sampled_from([1, 2, 3])),
        head_dim=head_dim,
        v_head_dim=draw(st.sampled_from([head_dim, 8])),  # 8 != 16/24: MLA-style separate v dim
        tk=tk,
        tq=draw(st.integers(1, min(tk, 6))),
        causal=draw(st.booleans()),
        padding=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "round_robin"])),
        num_splits=draw(st.integers(1, 3)),
        equal_slices=draw(st.booleans()),
    )


def make_inputs(c: Case):
    g = torch.Generator().manual_seed(c.seed)
    hq = c.kv_heads * c.rep
    q = torch.randn(c.batch, hq, c.tq, c.head_dim, generator=g)
    k = torch.randn(c.batch, c.kv_heads, c.tk, c.head_dim, generator=g)
    v = torch.randn(c.batch, c.kv_heads, c.tk, c.v_head_dim, generator=g)
    kpos = torch.arange(c.tk)
    qpos = torch.arange(c.tk - c.tq, c.tk)  # the queries are the last tq tokens (decode / prefill chunk)
    mask = torch.ones(c.batch, 1, c.tq, c.tk, dtype=torch.bool)
    if c.causal:
        mask &= kpos[None, :] <= qpos[:, None]
    if c.padding:  # left padding per row, never hiding every key of a query
        starts = torch.randint(0, c.tk - c.tq + 1, (c.batch,), generator=g)
        mask &= (kpos[None, :] >= starts[:, None])[:, None, None, :]
    return q, k, v, mask


def local_slice(c: Case, k, v, mask, rank: int, world: int):
    idx = torch.arange(c.tk)
    owner = idx % world if c.layout == "round_robin" else idx // -(-c.tk // world)
    mine = idx[owner == rank]
    lk, lv, lm = k[:, :, mine], v[:, :, mine], mask[..., mine]
    cap = -(-c.tk // world)
    if c.equal_slices and len(mine) < cap:  # pad with loud garbage the mask must hide
        n = cap - len(mine)
        lk = torch.cat([lk, torch.full((*lk.shape[:2], n, lk.shape[-1]), 1e4)], dim=2)
        lv = torch.cat([lv, torch.full((*lv.shape[:2], n, lv.shape[-1]), 1e4)], dim=2)
        lm = torch.cat([lm, torch.zeros((*lm.shape[:-1], n), dtype=torch.bool)], dim=-1)
    return lk, lv, lm


def run_case(c: Case):
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v, mask = make_inputs(c)
    lk, lv, lm = local_slice(c, k, v, mask, rank, world)
    name = dist.group.WORLD.group_name
    with comm_stats.counting() as tree_stats:
        tree = tree_attention(q, lk, lv, lm, c.head_dim**-0.5, name, c.num_splits)
    with comm_stats.counting() as gather_stats:
        gathered = tree_attention(q, lk, lv, lm, c.head_dim**-0.5, name, c.num_splits, "allgather")
    ring, ring_stats = None, None
    if c.equal_slices:
        with comm_stats.counting() as ring_stats:
            ring = ring_attention(q, lk, lv, lm, c.head_dim**-0.5, name)
    return tree, gathered, ring, tree_stats, gather_stats, ring_stats


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"world{w}")
def group(request):
    with LocalGroup(request.param) as g:
        yield g


@settings(
    max_examples=EXAMPLES_PER_WORLD,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(c=cases())
def test_tree_and_ring_equal_dense(group, c: Case, case_counter):
    q, k, v, mask = make_inputs(c)
    scale = c.head_dim**-0.5
    want = reference_attention(q, k, v, mask, scale)
    s = (q.reshape(c.batch, c.kv_heads, c.rep * c.tq, -1) @ k.transpose(-1, -2)).view(
        c.batch, -1, c.tq, c.tk
    ) * scale
    want_lse = s.masked_fill(~mask, float("-inf")).logsumexp(-1)
    results = group.run(run_case, c)
    for rank, (tree, gathered, ring, tree_stats, gather_stats, ring_stats) in enumerate(results):
        torch.testing.assert_close(
            tree[0], want, rtol=1e-5, atol=1e-5, msg=lambda m, r=rank: f"tree rank {r}: {m}"
        )
        torch.testing.assert_close(tree[1], want_lse, rtol=1e-5, atol=1e-5)
        # tree: a constant 2 all-reduces (MAX of lse, SUM of packed [w*o, w]) whatever the world size
        assert tree_stats["calls"] == {"all_reduce": 2}
        torch.testing.assert_close(gathered[0], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gathered[1], want_lse, rtol=1e-5, atol=1e-5)
        assert gather_stats["calls"] == {"all_gather": 1}  # the one-round merge
        if ring is not None:
            torch.testing.assert_close(
                ring[0], want, rtol=1e-5, atol=1e-5, msg=lambda m, r=rank: f"ring rank {r}: {m}"
            )
            torch.testing.assert_close(ring[1], want_lse, rtol=1e-5, atol=1e-5)
            p = group.world
            assert ring_stats["calls"] == ({"send": p - 1, "recv": p - 1} if p > 1 else {})
    key = f"tree/ring vs dense attention, world {group.world}"
    case_counter[key] = case_counter.get(key, 0) + 1
