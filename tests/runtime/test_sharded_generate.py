"""Generation over a KV cache sharded along the sequence on 2 and 4 gloo ranks equals one process."""

from __future__ import annotations

import pytest
import torch

import zycompile
from zycompile.errors import RecipeError, ZyError
from zycompile.ops import comm_stats
from zycompile.parallel.local_group import LocalGroup
from zycompile.runtime.sharded_kv_cache import SeqShardedKVCache

PROMPTS = [[5, 17, 33, 2, 9], [7, 8], list(range(40, 75)), [100, 101, 102]]
LAYERS = 2  # tiny:llama


def recipe(mode="sp", world=2, impl="tree", splits=1, layout="round_robin"):
    tree = {"name": "tree_attention", "group": "sequence" if mode == "sp" else "none", "impl": impl}
    return {
        "model": {"source": "tiny:llama"},
        "parallel": {"mode": mode, "degree": world, "kv_layout": layout},
        "passes": ["canonicalize_attention", "fuse_projections", {**tree, "num_splits": splits}],
        "lowering": {"backend": "aot_eager"},
        "runtime": {"max_seq_len": 96, "batch_buckets": [1, 2, 4], "prefill_buckets": [8, 32]},
        "debug": {"strict": True},
    }


def single_process_tokens():
    r = {**recipe("none", 1), "passes": ["canonicalize_attention"]}
    return zycompile.optimize("tiny:llama", r).generate(PROMPTS, max_new_tokens=12, ignore_eos=True).tokens


def generate_and_count(r):
    torch._dynamo.reset()
    opt = zycompile.optimize("tiny:llama", r)
    tokens = opt.generate(PROMPTS, max_new_tokens=12, ignore_eos=True).tokens
    gen = opt.generator()
    with comm_stats.counting() as stats:  # one decode step of a batch of 1
        gen.step(torch.tensor([[3]]), torch.tensor([[20]]), torch.tensor([0]))
    return tokens, stats["calls"], gen.cache.key_positions.tolist()


@pytest.fixture(scope="module")
def want():
    torch._dynamo.reset()
    return single_process_tokens()


def test_single_device_split_kv_equals_plain(want):
    torch._dynamo.reset()
    opt = zycompile.optimize("tiny:llama", recipe("none", 1, splits=3))
    assert opt.generate(PROMPTS, max_new_tokens=12, ignore_eos=True).tokens == want
    assert [p.matches for p in opt.compile_report().passes if p.name == "tree_attention"][0] == LAYERS


@pytest.mark.full_world4
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_greedy_equals_single_process_and_counts_collectives(world, want):
    with LocalGroup(world) as g:
        for impl, layout in [("tree", "round_robin"), ("ring", "contiguous")]:
            results = g.run(generate_and_count, recipe("sp", world, impl=impl, layout=layout))
            slots = set()
            for tokens, calls, key_positions in results:
                assert tokens == want, f"{impl}/{layout} on {world} ranks"
                if impl == "tree":  # a constant 2 all-reduces per layer per decode step
                    assert calls == {"all_reduce": 2 * LAYERS}
                else:  # p-1 send/recv rounds per layer
                    assert calls == {"send": (world - 1) * LAYERS, "recv": (world - 1) * LAYERS}
                slots.update(p for p in key_positions if p < 96)
            assert slots == set(range(96))  # every position has exactly one owner among the ranks


def test_round_robin_balances_appended_tokens():
    caches = [SeqShardedKVCache(1, 1, 1, 50, 4, torch.float32, rank=r, world=4) for r in range(4)]
    for n in range(1, 51):  # after n tokens the ranks' fill differs by at most one
        fill = [int((c.key_positions < n).sum()) for c in caches]
        assert max(fill) - min(fill) <= 1 and sum(fill) == n
    pos = torch.arange(50)
    for c in caches:  # a position goes to its owner's slot, elsewhere to the trash slot
        slots = c.slot_of(pos)
        owned = c.owner_of(pos) == c.rank
        assert (c.key_positions[slots[owned]] == pos[owned]).all()
        assert (slots[~owned] == c.local_len).all()


def test_recipe_rules_for_sequence_sharding():
    with pytest.raises(RecipeError, match=r"parallel.mode.*tree_attention, group: sequence"):
        zycompile.load_recipe({**recipe("sp", 2), "passes": ["canonicalize_attention"]})
    with pytest.raises(RecipeError, match=r"passes\[2\].group.*'sequence' needs parallel.mode"):
        zycompile.load_recipe({**recipe("none", 1), "passes": recipe()["passes"]})
    with pytest.raises(RecipeError, match=r"passes\[2\].impl.*needs group: sequence"):
        zycompile.load_recipe(recipe("none", 1, impl="ring"))


def test_sp_recipe_without_ranks_is_a_clear_error():
    with pytest.raises(ZyError, match="needs 2 processes: launch with torchrun --nproc-per-node 2"):
        zycompile.optimize("tiny:llama", recipe("sp", 2))
