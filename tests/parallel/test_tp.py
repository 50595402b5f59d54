"""Plain TP on DTensor over 2 and 4 gloo ranks: logits and greedy tokens equal one process."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

import zycompile
from zycompile.models import load_model
from zycompile.parallel.local_group import LocalGroup
from zycompile.parallel.tp import ShardingError, apply_tp, check_divisible, local_bytes

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
    torch._dynamo.reset()
    opt = zycompile.optimize(source, recipe(source, world))
    return opt.generate(PROMPTS, max_new_tokens=10, ignore_eos=True).tokens, opt.compile_report().warnings


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


def test_tp_greedy_generation_equals_one_process(group):
    source = ARCHS[0]
    torch._dynamo.reset()
    want = (
        zycompile.optimize(source, recipe(source, 1))
        .generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
        .tokens
    )
    for tokens, warnings in group.run(sharded_generate, source, group.world):
        assert tokens == want
        assert any("fuse_projections' skipped under parallel.mode 'tp'" in w for w in warnings)


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
