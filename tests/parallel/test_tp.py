"""Plain TP on DTensor over 2 and 4 gloo ranks: logits and greedy tokens equal one process."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

import zycompile
from zycompile.models import load_model
from zycompile.parallel.local_group import LocalGroup
from zycompile.parallel.tp import ShardingError, apply_tp, check_divisible, local_bytes
from zycompile.passes.fuse_projections import _adjacent

PROMPTS = [[5, 17, 33, 2, 9], [7, 8], list(range(40, 75))]
IDS = torch.tensor([[5, 17, 33, 2, 9, 11, 40, 41]])
# 4 KV heads so degree 4 divides them; tied embeddings to cover the shared vocab shard
ARCHS = ["tiny:llama?num_key_value_heads=4&tie_word_embeddings=true", "tiny:qwen3?num_key_value_heads=4"]


def recipe(source: str, world: int) -> dict:
    return {
        "model": {"source": source},
        "parallel": {"mode": "tp" if world > 1 else "none", "degree": world},
        "passes": ["canonicalize_attention", "weight_layout", "fuse_projections"],
        "lowering": {"backend": "aot_eager"},
        "runtime": {"max_seq_len": 96, "batch_buckets": [1, 4], "prefill_buckets": [8, 32]},
    }


def sharded_forward(source: str, world: int):
    """Eager logits of the sharded model, collectives of that forward, and this rank's weight bytes."""
    model = load_model(source).model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    apply_tp(model, world)
    with torch.no_grad(), CommDebugMode() as comm:
        logits = model(IDS).logits
    counts = {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}
    mine = sum(local_bytes(p) for p in model.parameters())
    return logits, counts, mine, total


def sharded_generate(source: str, world: int):
    """Greedy tokens, compiled logits, and what fuse_projections did on this rank's shards."""
    torch._dynamo.reset()
    opt = zycompile.optimize(source, recipe(source, world))
    tokens = opt.generate(PROMPTS, max_new_tokens=10, ignore_eos=True).tokens
    with torch.no_grad():
        logits = opt(IDS).logits
    report = opt.compile_report()
    fused = [r.matches for r in report.passes if r.name == "fuse_projections"]
    attn, mlp = opt.model.model.layers[0].self_attn, opt.model.model.layers[0].mlp
    shards = {
        "q": tuple(attn.q_proj.weight.shape),
        "gate": tuple(mlp.gate_proj.weight.shape),
        # this rank's q/k/v (gate/up) rows lie back to back in one buffer: one local GEMM each
        "qkv_one_buffer": _adjacent([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
        "gate_up_one_buffer": _adjacent([mlp.gate_proj.weight, mlp.up_proj.weight]),
    }
    return tokens, logits, fused, shards, report.warnings


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def group(request):
    with LocalGroup(request.param) as g:
        yield g


@pytest.mark.parametrize("source", ARCHS)
def test_tp_logits_collectives_and_memory(group, source):
    want = load_model(source).model(IDS).logits.detach()
    layers = 2
    for logits, counts, mine, total in group.run(sharded_forward, source, group.world):
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        # one all-reduce after o_proj and one after down_proj per layer, one for the vocab-sharded
        # embedding; the vocab-sharded head all-gathers the logits
        assert counts == {"all_reduce": 2 * layers + 1, "all_gather_into_tensor": 1}
        # norms are replicated: each rank holds 1/D of everything else
        assert abs(mine - total / group.world) / total < 0.02


@pytest.mark.full_world4
def test_tp_greedy_generation_equals_one_process_with_fusion_per_shard(group):
    source, d = ARCHS[0], group.world
    torch._dynamo.reset()
    want_tokens, want_logits, want_fused, _, _ = sharded_generate(source, 1)
    layers = 2
    assert want_fused and all(m == 2 * layers for m in want_fused)  # one process: q/k/v and gate/up fused
    for tokens, logits, fused, shards, warnings in group.run(sharded_generate, source, d):
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
        # fuse_projections ran on every graph (prefill buckets, decode, the forward): per layer one
        # local GEMM for this rank's q/k/v column shards and one for gate/up
        assert len(fused) == len(want_fused) and all(m == 2 * layers for m in fused)
        assert shards == {
            "q": (64 // d, 64),
            "gate": (128 // d, 64),
            "qkv_one_buffer": True,
            "gate_up_one_buffer": True,
        }
        assert not any("fuse_projections" in w for w in warnings)
        assert (
            "pass 'weight_layout' skipped under parallel.mode 'tp' (it re-lays unsharded weights)" in warnings
        )


def test_indivisible_heads_refused_before_sharding():
    cfg = load_model("tiny:llama").model.config  # 4 heads, 2 KV heads
    check_divisible(cfg, 2)
    with pytest.raises(ShardingError, match="num_key_value_heads=2, which 4 ranks cannot split evenly"):
        check_divisible(cfg, 4)
    smol = load_model(
        "tiny:llama?num_attention_heads=9&num_key_value_heads=3&hidden_size=144&intermediate_size=384"
    ).model.config
    check_divisible(smol, 3)
    with pytest.raises(ShardingError, match="num_attention_heads=9"):
        check_divisible(smol, 2)
