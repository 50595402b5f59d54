"""Continuous batching: each request gets exactly its solo tokens, joining mid-stream; bad ones alone fail."""

from __future__ import annotations

import pytest
import torch

import zycompile
from zycompile.runtime.engine import Engine
from zycompile.runtime.sampling import SamplingParams

FAST = ["lowering.backend=aot_eager", "runtime.prefill_buckets=[8, 16]", "runtime.max_seq_len=96"]
PROMPTS = [
    [5, 17, 33, 2, 9],
    [7, 8],
    list(range(40, 80)),
    [100] * 3,
    list(range(200, 230)),
    [1, 2, 3, 4, 5, 6, 7],
]


@pytest.fixture(scope="module")
def gen():
    torch._dynamo.reset()
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=FAST)
    return opt.generator()


@pytest.fixture(scope="module")
def dyn_gen():
    torch._dynamo.reset()
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=[*FAST, "runtime.prefill=dynamic"])
    return opt.generator()


def _params(n=10):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def test_requests_joining_mid_stream_get_their_solo_tokens(gen):
    solo = [gen.generate([p], max_new_tokens=10, ignore_eos=True).tokens[0] for p in PROMPTS]
    eng = Engine(gen, max_concurrency=3)
    reqs = [eng.add_request(p, _params()) for p in PROMPTS[:3]]
    for _ in range(5):  # the first three are decoding when the rest arrive
        eng.step()
    assert any(r.output for r in reqs)
    reqs += [eng.add_request(p, _params()) for p in PROMPTS[3:]]
    eng.run()
    assert [r.output for r in reqs] == solo
    assert all(len(r.token_times) == 10 for r in reqs)


def test_concurrency_is_respected_and_slots_reused(gen):
    eng = Engine(gen, max_concurrency=2)
    for p in PROMPTS:
        eng.add_request(p, _params(4))
    peak = 0
    while eng.has_work:
        eng.step()
        peak = max(peak, len(eng.running))
    assert peak == 2
    assert len(eng.finished) == len(PROMPTS)


def test_a_long_reply_left_in_a_high_slot_moves_down_to_a_smaller_bucket(gen, monkeypatch):
    """Slots 0-1 finish first; the long request in slot 2 (bucket 4) moves to slot 0 and decodes at
    batch 1 from then on, with exactly its solo tokens."""
    lens = [3, 3, 12]
    solo = [gen.generate([p], max_new_tokens=n, ignore_eos=True).tokens[0] for p, n in zip(PROMPTS, lens)]
    widths: list[int] = []
    real_step = gen.step
    monkeypatch.setattr(
        gen, "step", lambda ids, *a, **k: widths.append(ids.shape[0]) or real_step(ids, *a, **k)
    )
    eng = Engine(gen, max_concurrency=3)
    reqs = [eng.add_request(p, _params(n)) for p, n in zip(PROMPTS, lens)]
    eng.run()
    assert [r.output for r in reqs] == solo
    assert eng.moves == 1 and reqs[2].slot == 0
    assert widths[-1] == 1 and widths.count(1) >= 5  # the tail ran at batch 1, not 4


def test_bad_request_is_rejected_alone(gen):
    eng = Engine(gen)
    good = eng.add_request(PROMPTS[0], _params(5))
    too_long = eng.add_request(list(range(95)), _params(5))
    empty = eng.add_request([], _params(5))
    eng.run()
    assert "max_seq_len is 96" in too_long.error and "empty" in empty.error
    assert good.error is None and len(good.output) == 5


def test_no_recompiles_in_steady_state(gen):
    eng = Engine(gen, max_concurrency=4)
    for p in PROMPTS:
        eng.add_request(p, _params(6))
    eng.run()  # compiles what this mix needs
    before = len(gen.opt.compile_report().graphs)
    eng2 = Engine(gen, max_concurrency=4)
    for p in reversed(PROMPTS):
        eng2.add_request(p, _params(8))
    eng2.run()
    assert len(gen.opt.compile_report().graphs) == before


def _attention_key_lengths(fn) -> list[int]:
    """Key lengths ``zycompile::attention`` saw while ``fn`` ran, in call order."""
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        fn()
    # Calls made while tracing a graph carry no shapes; callers compile their graphs before measuring.
    return [
        e.input_shapes[1][2]
        for e in prof.events()
        if e.name == "zycompile::attention" and len(e.input_shapes) > 1
    ]


def test_dynamic_prefill_reads_only_the_filled_prefix_and_keeps_solo_tokens(gen, dyn_gen):
    solo = [gen.generate([p], max_new_tokens=10, ignore_eos=True).tokens[0] for p in PROMPTS]  # buckets
    eng = Engine(dyn_gen, max_concurrency=3)
    reqs = [eng.add_request(p, _params()) for p in PROMPTS[:3]]
    for _ in range(5):
        eng.step()
    reqs += [eng.add_request(p, _params()) for p in PROMPTS[3:]]
    eng.run()
    assert [r.output for r in reqs] == solo

    # A 40-token prompt into slot 1 in chunks of 16: each chunk attends over positions [0, end of chunk),
    # not the 96-slot row; the decode step after it reads every slot (CPU attention trims the tail).
    def chunked_prefill_next_to_a_decoding_request():
        eng = Engine(dyn_gen, max_concurrency=2)
        eng.add_request(PROMPTS[0], _params(30))  # holds slot 0
        eng.step()
        req = eng.add_request(PROMPTS[2], _params(2))
        lens = _attention_key_lengths(lambda: [eng.step() for _ in range(3)])
        return req, lens

    chunked_prefill_next_to_a_decoding_request()  # compiles the batch-2 decode graph (traces call the op)
    graphs = len(dyn_gen.opt.compile_report().graphs)
    req, lens = chunked_prefill_next_to_a_decoding_request()
    assert len(dyn_gen.opt.compile_report().graphs) == graphs  # chunks at start > 0: the same graph
    layers = dyn_gen.model.config.num_hidden_layers
    assert req.slot == 1 and req.prefilled == 40
    want = []
    for end in (16, 32, 40):  # each engine step: one prefill chunk, then slot 0's decode step
        want += [end] * layers + [96] * layers
    assert lens == want


def test_a_prompt_with_nobody_decoding_is_prefilled_in_one_forward(gen, dyn_gen):
    """Chunks exist so decoding requests do not stall behind a long prompt; alone, the 40-token prompt
    goes in one forward of the symbolic-length graph (its keys: 40), with the same tokens."""
    solo = gen.generate([PROMPTS[2]], max_new_tokens=4, ignore_eos=True).tokens[0]
    warm = Engine(dyn_gen, max_concurrency=2)  # compiles the graphs first (tests may run in any order)
    warm.add_request(PROMPTS[2], _params(4))
    warm.run()
    eng = Engine(dyn_gen, max_concurrency=2)
    req = eng.add_request(PROMPTS[2], _params(4))
    lens = _attention_key_lengths(eng.step)
    layers = dyn_gen.model.config.num_hidden_layers
    assert req.prefilled == 40 and lens[:layers] == [40] * layers
    eng.run()
    assert req.output == solo
