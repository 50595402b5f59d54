"""The engine's prefix cache: shared prompt openings are prefilled once, tokens stay the solo tokens."""

from __future__ import annotations

import pytest
import torch

import zycompile
from zycompile.bench.cli import _prefix_note
from zycompile.bench.metrics import RequestTiming, summarize
from zycompile.runtime.engine import Engine
from zycompile.runtime.kv_cache import StaticKVCache
from zycompile.runtime.prefix_cache import PrefixCache, prefix_cache_for
from zycompile.runtime.sampling import SamplingParams

FAST = ["lowering.backend=aot_eager", "runtime.prefill_buckets=[8, 16]", "runtime.max_seq_len=96"]
SHARED = list(range(300, 340))  # 40 tokens: two full 16-token blocks and a partial one


@pytest.fixture(scope="module", params=["buckets", "dynamic"])
def gen(request):
    torch._dynamo.reset()
    opt = zycompile.optimize(
        "tiny:llama", "llama-tiny", overrides=[*FAST, f"runtime.prefill={request.param}"]
    )
    return opt.generator()


def _params(n=8):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def test_a_shared_opening_is_prefilled_once_and_every_request_keeps_its_solo_tokens(gen):
    prompts = [SHARED + [1, 2, 3], SHARED + [9, 8, 7, 6], SHARED[:20] + [5, 5], [7, 7, 7]]
    solo = [gen.generate([p], max_new_tokens=8, ignore_eos=True).tokens[0] for p in prompts]
    eng = Engine(gen, max_concurrency=2)
    reqs = [eng.add_request(p, _params()) for p in prompts]
    eng.run()
    assert [r.output for r in reqs] == solo
    # the first request fills the cache; the second reuses both full blocks, the third the first one
    assert [r.cached for r in reqs] == [0, 32, 16, 0]
    assert eng.prefix.hit_tokens == 48
    assert eng.prefix.hit_rate == pytest.approx(48 / sum(map(len, prompts)))


def test_a_hit_leaves_tokens_to_prefill_and_copies_the_exact_cache_rows(gen):
    cache = gen.cache
    eng = Engine(gen, max_concurrency=1)
    first = eng.add_request(SHARED[:32], _params(2))
    eng.run()
    # a prompt equal to the cached 32 tokens still prefills its last block: a hit needs >= 2 tokens left
    assert eng.prefix.load(SHARED[:32], slot=1) == 16
    assert eng.prefix.load(SHARED[:34], slot=1) == 32
    for layer in range(len(cache.keys)):
        torch.testing.assert_close(
            cache.keys[layer][1, :, :32], cache.keys[layer][first.slot, :, :32], rtol=0, atol=0
        )
        torch.testing.assert_close(
            cache.values[layer][1, :, :32], cache.values[layer][first.slot, :, :32], rtol=0, atol=0
        )


def test_least_recently_used_blocks_go_first_and_never_before_their_children():
    cache = StaticKVCache(num_layers=2, batch=2, kv_heads=1, max_seq_len=64, head_dim=4, dtype=torch.float32)
    block_bytes = 2 * 2 * 1 * 16 * 4 * 4  # keys + values, 2 layers, 16 tokens, 4 dims, fp32
    pc = PrefixCache(cache, max_bytes=3 * block_bytes)
    a, b = list(range(48)), list(range(16)) + list(range(100, 132))  # share their first block
    pc.store(a, slot=0)  # blocks a0 a1 a2
    assert pc.bytes == 3 * block_bytes
    pc.store(b, slot=1)  # b1 b2 are new: two blocks must go, the least recent leaves of a's chain
    assert pc.bytes == 3 * block_bytes
    assert pc.load(a + [0, 0], slot=0) == 16  # a1 (and so a2) evicted; the shared first block stays
    assert pc.load(b + [0, 0], slot=0) == 48


def test_off_in_the_recipe_for_speculative_recipes_and_sharded_caches(gen):
    assert isinstance(prefix_cache_for(gen), PrefixCache)
    torch._dynamo.reset()
    off = zycompile.optimize("tiny:llama", "llama-tiny", overrides=[*FAST, "runtime.prefix_cache_mb=0"])
    assert Engine(off.generator()).prefix is None
    spec = zycompile.optimize(
        "tiny:llama", "llama-tiny", overrides=[*FAST, "speculative.method=ngram", "speculative.num_tokens=2"]
    )
    assert Engine(spec.generator()).prefix is None


def test_bench_reports_the_tokens_the_prefix_cache_served():
    t = [RequestTiming(0.0, [0.1, 0.2], 40, 32), RequestTiming(0.0, [0.3], 10, 0)]
    m = summarize(t)
    assert (m["input_tokens"], m["prefix_cached_tokens"]) == (50, 32)
    assert _prefix_note({1: m}) == "; zycompile's prefix cache served 32 of 50 prompt tokens at c=1"
    assert _prefix_note({1: summarize([RequestTiming(0.0, [0.1], 40)])}) == ""
