"""Mixed steps: a prompt's chunks ride in the decode steps of the others, and nobody's tokens change."""

from __future__ import annotations

import pytest
import torch
from test_engine import (  # the engine tests' recipe, prompts and params (tests/runtime on sys.path)
    FAST,
    PROMPTS,
    _params,
)

import zycompile
from zycompile.runtime.engine import Engine


@pytest.fixture(scope="module")
def gen():
    torch._dynamo.reset()
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=[*FAST, "runtime.mixed_prefill_tokens=4"])
    return opt.generator()


def test_prompts_prefilled_inside_decode_steps_keep_every_request_s_solo_tokens(gen):
    solo = [gen.generate([p], max_new_tokens=10, ignore_eos=True).tokens[0] for p in PROMPTS]
    calls = {"mixed": 0}
    real = gen.mixed

    def counting(args):
        calls["mixed"] += 1
        return real(args)

    gen.mixed = counting
    try:
        eng = Engine(gen, max_concurrency=3)
        reqs = [eng.add_request(p, _params()) for p in PROMPTS[:3]]
        for _ in range(5):  # the first three are decoding when the rest arrive
            eng.step()
        reqs += [eng.add_request(p, _params()) for p in PROMPTS[3:]]
        eng.run()
    finally:
        del gen.mixed
    assert calls["mixed"] >= 10  # PROMPTS[2] alone needs 10 chunks of 4 once others decode
    assert [r.output for r in reqs] == solo
    assert all(len(r.token_times) == 10 for r in reqs)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def arch_gen(request, gen):
    if request.param == "llama":
        return gen
    torch._dynamo.reset()
    opt = zycompile.optimize(
        f"tiny:{request.param}", "llama-tiny", overrides=[*FAST, "runtime.mixed_prefill_tokens=4"]
    )
    return opt.generator()


def test_a_mixed_step_matches_a_decode_step_and_a_prefill_chunk_run_apart(arch_gen):
    """Logits of one mixed step (2 decode rows + a 3-token chunk padded to 4) against the same work as a
    decode step and a prefill chunk; the cache ends with the same K/V in the written slots."""
    from zycompile.runtime import mixed_step

    gen = arch_gen
    cache = gen.cache
    cache.reset()
    gen.prefill([[3, 4, 5, 6], [9, 10]], [4, 2])  # rows 0-1 hold prompts of 4 and 2 tokens
    prompt = [11, 12, 13, 14, 15]
    gen.prefill_chunk([prompt], [5], 0, 2, torch.tensor([2]))  # row 2: the first 2 tokens
    ids, pos = torch.tensor([7, 8, 0, 0]), torch.tensor([4, 2, 5, 0])  # rows 2-3 idle
    saved = [t.clone() for t in (*cache.keys, *cache.values)]
    args = mixed_step.inputs(ids, pos, prompt[2:], 2, 4, 2, gen.max_seq_len)
    mixed = gen.mixed(args)
    after = [t.clone() for t in (*cache.keys, *cache.values)]
    for t, s in zip((*cache.keys, *cache.values), saved):
        t.copy_(s)
    dec = gen.step(ids[:, None], pos[:, None], torch.zeros(4, dtype=torch.long))
    pre = gen.prefill_chunk([prompt], [5], 2, 3, torch.tensor([2]))
    torch.testing.assert_close(mixed[:2], dec[:2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[4:], pre, rtol=1e-4, atol=1e-4)
    for a, t in zip(after, (*cache.keys, *cache.values)):
        torch.testing.assert_close(a[0, :, :5], t[0, :, :5])
        torch.testing.assert_close(a[1, :, :3], t[1, :, :3])
        torch.testing.assert_close(a[2, :, :5], t[2, :, :5])


def test_a_recipe_that_cannot_mix_says_so_and_prefills_chunks_alone(capsys):
    torch._dynamo.reset()
    opt = zycompile.optimize(
        "tiny:llama",
        "llama-tiny",
        overrides=[*FAST, "runtime.mixed_prefill_tokens=4", "speculative.method=ngram"],
    )
    gen = opt.generator()
    assert gen.mixed_tokens == 0
    assert "runtime.mixed_prefill_tokens ignored: the recipe speculates" in capsys.readouterr().err
    assert gen.model.config._attn_implementation == "sdpa"  # the model is left as it was
    eng = Engine(gen, max_concurrency=2)
    reqs = [eng.add_request(p, _params(4)) for p in PROMPTS[:3]]
    eng.run()
    assert all(len(r.output) == 4 for r in reqs)
