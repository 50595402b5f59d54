"""TSP (tensor + sequence parallel) on 2 and 4 gloo ranks: logits, greedy tokens and collectives vs one process."""

from __future__ import annotations

import collections
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zycompile
from zycompile.models import load_model
from zycompile.ops import comm_stats
from zycompile.parallel import distributed
from zycompile.parallel.local_group import LocalGroup
from zycompile.parallel.tp import ShardingError, check_divisible, local_bytes
from zycompile.parallel.tsp import apply_tsp, check_tsp
from zycompile.parallel.tsp_layers import MLP_PIECES
from zycompile.recipe import ParallelSection
from zycompile.runtime.sharded_kv_cache import SeqShardedKVCache

# 11 tokens: not a multiple of 2D for D = 2 or 4, so the zigzag split pads
IDS = torch.tensor([[5, 17, 33, 2, 9, 11, 40, 41, 3, 7, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
PROMPTS = [[5, 17, 33, 2, 9], [7, 8], list(range(40, 75))]  # 35 tokens: two prefill chunks of <= 32
ARCHS = ["tiny:llama?num_key_value_heads=4&tie_word_embeddings=true", "tiny:qwen3"]
LAYERS = 2


def recipe(source: str, world: int) -> dict:
    return {
        "model": {"source": source},
        "parallel": {"mode": "tsp" if world > 1 else "none", "degree": world},
        "passes": ["canonicalize_attention", "weight_layout", "fuse_projections"],
        "lowering": {"backend": "aot_eager"},
        "runtime": {"max_seq_len": 96, "batch_buckets": [1, 4], "prefill_buckets": [8, 32]},
    }


class FunctionalCollectives(TorchDispatchMode):
    """Counts the functional collectives an eager call issues (CommDebugMode's module tracker needs
    ``step`` to run inside a module forward; this counts the same c10d_functional ops, by name), and
    its 2-D GEMMs (``gemms``: every ``F.linear``)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.gemms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace == "_c10d_functional" and name != "wait_tensor" and not name.startswith("_"):
            self.counts[name] += 1
        self.gemms += func.namespace == "aten" and name in ("mm", "addmm")
        return func(*args, **(kwargs or {}))


def sharded_forward(source: str, world: int):
    """Eager TSP: all logits, the collectives of a prefill and of a decode step, this rank's weight bytes."""
    distributed.setup(ParallelSection(mode="tsp", degree=world))
    hf = load_model(source).model
    total = sum(p.numel() * p.element_size() for p in hf.parameters())
    model = apply_tsp(hf, world)
    cache = SeqShardedKVCache.for_model(model.config, 2, 32, torch.float32, rank=model.ring.rank, world=world)
    pos = torch.arange(IDS.shape[1]).expand_as(IDS).contiguous()
    last = torch.tensor([10, 4])
    with torch.no_grad():
        logits = model(IDS).logits
        cache.write_pos, cache.rows = pos, None
        with FunctionalCollectives() as prefill_comm:
            picked = model.step(IDS, pos, last, cache)
        one = torch.tensor([[3], [4]])
        cache.write_pos = torch.tensor([[11], [11]])
        with FunctionalCollectives() as decode_comm, comm_stats.counting() as tree:
            decoded = model.step(one, cache.write_pos, torch.zeros(2, dtype=torch.long), cache)
    mine = sum(local_bytes(p) for p in model.parameters())
    return (
        logits,
        picked,
        decoded,
        dict(prefill_comm.counts),
        dict(decode_comm.counts),
        tree["calls"],
        mine,
        total,
        (prefill_comm.gemms, decode_comm.gemms),
    )


def sharded_generate(source: str, world: int):
    torch._dynamo.reset()
    opt = zycompile.optimize(source, recipe(source, world))
    tokens = opt.generate(PROMPTS, max_new_tokens=10, ignore_eos=True).tokens
    return tokens, step_logits(opt), opt.compile_report().warnings


def step_logits(opt) -> list[torch.Tensor]:
    """Logits of a batched prefill (the long prompt takes two chunks) and two decode steps after it."""
    gen = opt.generator()
    lens = [len(p) for p in PROMPTS] + [1]
    out = [gen.prefill([*PROMPTS, [0]], lens)]
    pos = torch.tensor(lens)
    for i, tok in enumerate([[3], [4]]):
        ids = torch.tensor([tok] * 4)
        out.append(gen.step(ids, (pos + i)[:, None], torch.zeros(4, dtype=torch.long)))
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def group(request):
    with LocalGroup(request.param) as g:
        yield g


@pytest.mark.parametrize("source", ARCHS)
def test_tsp_logits_collectives_and_memory(group, source):
    d = group.world
    hf = load_model(source).model
    want = hf(IDS).logits.detach()
    want_next = hf(torch.cat([IDS, torch.tensor([[3], [4]])], 1)).logits[:, -1].detach()
    results = group.run(sharded_forward, source, d)
    for logits, picked, decoded, prefill, decode, tree, mine, total, gemms in results:
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(picked, want[[0, 1], [10, 4]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decoded, want_next, rtol=1e-5, atol=1e-5)
        # prefill, per layer: q/k/v and o weight shards broadcast in turn (2D), one K/V all-gather, the
        # MLP's D-1 ring steps of MLP_PIECES shifts each (all_to_all_single is permute_tensor's
        # transport) and no all-reduce; once: the embedding's D-1 ring shifts, one all-reduce picking
        # each row's last token, the vocab-sharded head's all-gather
        assert prefill == {
            "broadcast": 2 * d * LAYERS,
            "all_gather_into_tensor": LAYERS + 1,
            "all_to_all_single": (d - 1) * (MLP_PIECES * LAYERS + 1),
            "all_reduce": 1,
        }
        # decode, per layer: one all-gather of the q/k/v shards, one all-reduce each after o and down,
        # tree attention's 2 all-reduces (its own counter); once: embedding all-reduce, head all-gather
        assert decode == {"all_gather_into_tensor": LAYERS + 1, "all_reduce": 2 * LAYERS + 1}
        assert tree == {"all_reduce": 2 * LAYERS}
        # norms are replicated: each rank holds 1/D of everything else
        assert abs(mine - total / d) / total < 0.02
        # projections fused per shard (packed q/k/v and gate/up): prefill, per layer and shard, one GEMM
        # each for q/k/v and o, and per MLP block one for gate/up and one for down; decode, per layer:
        # 4 (q/k/v, o, gate/up, down); once: the LM head
        assert gemms == ((2 + 2 * MLP_PIECES) * d * LAYERS + 1, 4 * LAYERS + 1)


@pytest.mark.full_world4
def test_tsp_decode_logits_equal_one_process(group):
    """Decode through the sequence-sharded cache (and a second prefill chunk) vs one process's runtime."""
    source = ARCHS[1]
    torch._dynamo.reset()
    single = zycompile.optimize(source, recipe(source, 1))
    want_tokens = single.generate(PROMPTS, max_new_tokens=10, ignore_eos=True).tokens
    want_logits = step_logits(single)
    for tokens, logits, warnings in group.run(sharded_generate, source, group.world):
        assert tokens == want_tokens
        for got, want in zip(logits, want_logits):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert any(
            "'fuse_projections' skipped under parallel.mode 'tsp' (TSP's layers keep" in w for w in warnings
        )
        assert any("'canonicalize_attention' skipped" in w for w in warnings)


@pytest.mark.full_world4
def test_tsp_greedy_generation_tied_llama(group):
    source = ARCHS[0]
    torch._dynamo.reset()
    want = zycompile.optimize(source, recipe(source, 1)).generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
    for tokens, _, _ in group.run(sharded_generate, source, group.world):
        assert tokens == want.tokens


def test_indivisible_or_unsupported_refused_before_sharding():
    cfg = load_model("tiny:llama").model.config  # 4 heads x 16, 2 KV heads x 16, intermediate 128
    check_tsp(cfg, 2)
    check_tsp(cfg, 4)  # TSP gathers whole heads before attention: 2 KV heads need not divide 4 ranks
    with pytest.raises(ShardingError, match=r"num_attention_heads x head_dim=64, which 3 ranks cannot split"):
        check_tsp(cfg, 3)
    with pytest.raises(ShardingError, match=r"parallel.degree 3"):  # before any process group exists
        zycompile.optimize("tiny:llama", {**recipe("tiny:llama", 3)})
    # SmolLM2's shape (9 query heads, 3 KV heads): TP refuses 2 and 4, TSP splits the rows
    smol = load_model(
        "tiny:llama?num_attention_heads=9&num_key_value_heads=3&hidden_size=144&intermediate_size=384"
    ).model.config
    for d in (2, 4):
        check_tsp(smol, d)
        with pytest.raises(ShardingError, match="num_attention_heads=9"):
            check_divisible(smol, d)
    gpt2 = types.SimpleNamespace(model_type="gpt2")
    with pytest.raises(ShardingError, match="model_type 'gpt2' is not supported"):
        check_tsp(gpt2, 2)
