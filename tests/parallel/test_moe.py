"""Qwen3-MoE under TP and TSP on 2 and 4 gloo ranks: experts split whole across the ranks (expert
parallel), logits and greedy tokens equal one process, collectives per MoE layer, expert bytes 1/D."""

from __future__ import annotations

import pytest
import torch
from test_tsp import FunctionalCollectives  # same folder: pytest puts it on sys.path
from torch.distributed.tensor.debug import CommDebugMode

import zycompile
from zycompile.models import load_model
from zycompile.parallel import distributed
from zycompile.parallel.local_group import LocalGroup
from zycompile.parallel.moe import expert_partial
from zycompile.parallel.tp import ShardingError, apply_tp, check_divisible, local_bytes
from zycompile.parallel.tsp import apply_tsp, check_tsp
from zycompile.recipe import ParallelSection
from zycompile.runtime.sharded_kv_cache import SeqShardedKVCache

# 8 experts (top-2) in every layer; 4 KV heads so TP at degree 4 has whole heads
SOURCE = "tiny:qwen3_moe?num_key_value_heads=4"
LAYERS = 2
IDS = torch.tensor([[5, 17, 33, 2, 9, 11, 40, 41, 3, 7, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
PROMPTS = [[5, 17, 33, 2, 9], [7, 8], list(range(40, 61))]


def recipe(mode: str, world: int) -> dict:
    return {
        "model": {"source": SOURCE},
        "parallel": {"mode": mode if world > 1 else "none", "degree": world},
        "passes": ["canonicalize_attention"],
        "lowering": {"backend": "aot_eager"},
        # one prefill and one decode graph: the compiles dominate this test's time
        "runtime": {"max_seq_len": 64, "batch_buckets": [4], "prefill_buckets": [32]},
    }


def expert_bytes(model) -> int:
    return sum(
        local_bytes(p) for name, p in model.named_parameters() if "experts" in name or "w_gate_up" in name
    )


def sharded_eager(world: int):
    """TP and TSP eager: logits, collectives (TP forward; TSP prefill and decode), expert bytes."""
    out = {}
    tp = load_model(SOURCE).model
    apply_tp(tp, world)
    with torch.no_grad(), CommDebugMode() as comm:
        out["tp_logits"] = tp(IDS).logits
    out["tp_comm"] = {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}
    out["tp_expert_bytes"] = expert_bytes(tp)
    del tp
    distributed.setup(ParallelSection(mode="tsp", degree=world))
    tsp = apply_tsp(load_model(SOURCE).model, world)
    cache = SeqShardedKVCache.for_model(tsp.config, 2, 32, torch.float32, rank=tsp.ring.rank, world=world)
    with torch.no_grad():
        out["tsp_logits"] = tsp(IDS).logits
        cache.write_pos, cache.rows = torch.arange(11).expand(2, 11).contiguous(), None
        with FunctionalCollectives() as prefill:
            tsp.step(IDS, cache.write_pos, torch.tensor([10, 10]), cache)
        cache.write_pos = torch.tensor([[11], [11]])
        with FunctionalCollectives() as decode:
            out["tsp_decoded"] = tsp.step(
                torch.tensor([[3], [4]]), cache.write_pos, torch.zeros(2).long(), cache
            )
    out["tsp_prefill"], out["tsp_decode"] = dict(prefill.counts), dict(decode.counts)
    out["tsp_expert_bytes"] = expert_bytes(tsp)
    return out


def sharded_generate(mode: str, world: int):
    torch._dynamo.reset()
    opt = zycompile.optimize(SOURCE, recipe(mode, world))
    return opt.generate(PROMPTS, max_new_tokens=8, ignore_eos=True).tokens


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def group(request):
    with LocalGroup(request.param) as g:
        yield g


def test_expert_groups_sum_to_the_whole_layer():
    """Splitting the experts into groups and adding the partials gives HF's experts forward."""
    block = load_model(SOURCE).model.model.layers[0].mlp
    x = torch.randn(13, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, weights, idx = block.gate(x)
        want = block.experts(x, idx, weights)
        ex = block.experts
        for d in (1, 2, 4):
            g = ex.gate_up_proj.shape[0] // d
            parts = [
                expert_partial(x, idx, weights, ex.gate_up_proj[s], ex.down_proj[s], r * g, ex.act_fn)
                for r, s in enumerate(slice(r * g, (r + 1) * g) for r in range(d))
            ]
            assert all(p.abs().sum() > 0 for p in parts)  # every group has routed tokens here
            torch.testing.assert_close(sum(parts), want, rtol=1e-5, atol=1e-6)


def test_moe_tp_and_tsp_logits_collectives_and_expert_bytes(group):
    d = group.world
    hf = load_model(SOURCE).model
    with torch.no_grad():
        want = hf(IDS).logits
        want_next = hf(torch.cat([IDS, torch.tensor([[3], [4]])], 1)).logits[:, -1]
    experts_total = expert_bytes(hf)
    for out in group.run(sharded_eager, d):
        torch.testing.assert_close(out["tp_logits"], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["tsp_logits"], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["tsp_decoded"], want_next, rtol=1e-5, atol=1e-5)
        # TP, per layer: o_proj's all-reduce and one for the experts' partial sums; once: the
        # vocab-sharded embedding's all-reduce and the head's all-gather
        assert out["tp_comm"] == {"all_reduce": 2 * LAYERS + 1, "all_gather_into_tensor": 1}
        # TSP prefill, per MoE layer: the experts' D-1 ring shifts (all_to_all_single), no all-reduce;
        # attention as for dense models (2D broadcasts, one K/V all-gather)
        assert out["tsp_prefill"] == {
            "broadcast": 2 * d * LAYERS,
            "all_gather_into_tensor": LAYERS + 1,
            "all_to_all_single": (d - 1) * (LAYERS + 1),
            "all_reduce": 1,
        }
        # TSP decode, per layer: q/k/v all-gather, o all-reduce, one all-reduce of the experts' partials
        assert out["tsp_decode"] == {"all_gather_into_tensor": LAYERS + 1, "all_reduce": 2 * LAYERS + 1}
        assert out["tp_expert_bytes"] * d == experts_total
        assert out["tsp_expert_bytes"] * d == experts_total


@pytest.fixture(scope="module")
def one_process_tokens():
    torch._dynamo.reset()
    return sharded_generate("none", 1)


@pytest.mark.full_world4
def test_moe_greedy_generation_tp_and_tsp(group, one_process_tokens):
    for mode in ("tp", "tsp"):
        for tokens in group.run(sharded_generate, mode, group.world):
            assert tokens == one_process_tokens, mode


def test_indivisible_experts_refused_before_sharding():
    six = load_model("tiny:qwen3_moe?num_experts=6&num_key_value_heads=4").model
    check_divisible(six.config, 2)
    check_tsp(six.config, 2)
    with pytest.raises(ShardingError, match="num_experts=6, which 4 ranks cannot split evenly"):
        check_divisible(six.config, 4)
    with pytest.raises(ShardingError, match="num_experts=6, which 4 ranks cannot split evenly"):
        check_tsp(six.config, 4)
    with pytest.raises(ShardingError, match="sequence_parallel: not supported for MoE"):
        apply_tp(six, 2, sequence_parallel=True)  # refused before any process group is needed
