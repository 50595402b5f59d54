"""Serving metrics on a fake clock, and arrival schedules."""

from __future__ import annotations

import statistics

import pytest

from zycompile.bench.metrics import RequestTiming, summarize, tokens_per_dollar
from zycompile.bench.workload import arrival_times


def test_ttft_tpot_itl_on_a_fake_clock():
    a = RequestTiming(arrival=0.0, token_times=[0.5, 0.6, 0.7, 0.8], prompt_len=10)
    b = RequestTiming(arrival=1.0, token_times=[1.2, 1.5], prompt_len=4)
    assert a.ttft == pytest.approx(0.5) and b.ttft == pytest.approx(0.2)
    assert a.tpot == pytest.approx(0.1) and b.tpot == pytest.approx(0.3)
    assert a.output_tok_s == pytest.approx(10.0)
    m = summarize([a, b])
    assert m["completed"] == 2 and m["output_tokens"] == 6 and m["input_tokens"] == 14
    assert m["duration_s"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["request_throughput"] == pytest.approx(2 / 1.5)
    assert m["ttft_mean_ms"] == pytest.approx(350.0) and m["ttft_median_ms"] == pytest.approx(350.0)
    assert m["tpot_median_ms"] == pytest.approx(200.0)
    assert m["itl_median_ms"] == pytest.approx(100.0)


def test_single_token_request_has_no_tpot():
    r = RequestTiming(arrival=0.0, token_times=[0.25])
    assert r.tpot is None and r.output_tok_s is None
    assert summarize([r])["ttft_median_ms"] == pytest.approx(250.0)


def test_tokens_per_dollar():
    assert tokens_per_dollar(100.0, 3.6) == pytest.approx(100_000.0)
    assert tokens_per_dollar(100.0, None) is None


def test_burst_and_fixed_interval():
    assert arrival_times(4, "burst", None) == [0.0] * 4
    assert arrival_times(4, "interval", 2.0) == [0.0, 0.5, 1.0, 1.5]


def test_poisson_mean_rate():
    times = arrival_times(20000, "poisson", 5.0, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.2, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(0.2, rel=0.05)  # exponential: sd == mean
    assert times == arrival_times(20000, "poisson", 5.0, seed=1)


def test_bad_rate():
    with pytest.raises(ValueError, match="request-rate"):
        arrival_times(3, "interval", 0.0)


def test_prefill_mfu_is_prefill_flops_over_ttft_over_peak():
    from zycompile.bench.metrics import prefill_mfu

    a = RequestTiming(arrival=0.0, token_times=[0.5, 0.6], prompt_len=10)
    b = RequestTiming(arrival=0.0, token_times=[0.25], prompt_len=20, cached_len=16)
    flops = {(10, 0): 100.0, (20, 16): 400.0}.__getitem__
    # a: 100 / 0.5 / 1000 = 0.2; b: 400 / 0.25 / 1000 = 1.6; median of two = their mean
    assert prefill_mfu([a, b], lambda n, cached: flops((n, cached)), 1000.0) == pytest.approx(0.9)


def test_prefill_flops_counts_linears_causal_attention_and_one_head_row():
    from zycompile.models import load_model
    from zycompile.runtime.metrics import prefill_flops

    model = load_model("tiny:llama").model
    c = model.config
    d, f, h, kv, layers, v = (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.num_hidden_layers,
        c.vocab_size,
    )
    hd = d // h
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f  # q, k, v, o, gate/up/down
    t = 7
    want = 2 * layers * per_layer * t + 2 * 2 * layers * h * hd * (t * (t + 1) / 2) + 2 * v * d
    assert prefill_flops(model, t) == pytest.approx(want)
    # with the first 3 tokens' K/V from the prefix cache: 4 computed tokens, queries 3..6 see 4..7 keys
    want = 2 * layers * per_layer * 4 + 2 * 2 * layers * h * hd * (4 + 5 + 6 + 7) + 2 * v * d
    assert prefill_flops(model, t, cached=3) == pytest.approx(want)


def test_random_prompts_share_one_prefix_of_prefix_len_tokens():
    from zycompile.bench.workload import build_workload

    common = dict(num_prompts=4, seed=3, dataset="random", input_len=10, output_len=5)
    rest = dict(max_output_len=64, max_prompt_len=512, arrival="burst", rate=None)
    items = build_workload(1000, None, prefix_len=24, **common, **rest)
    plain = build_workload(1000, None, **common, **rest)
    assert all(len(it.prompt_ids) == 34 for it in items)
    assert len({it.prompt_ids[:24] for it in items}) == 1  # one shared prefix
    assert [it.prompt_ids[24:] for it in items] == [it.prompt_ids for it in plain]  # then the same prompts
    with pytest.raises(ValueError, match="--prefix-len 8: .* with --dataset random"):
        build_workload(1000, None, prefix_len=8, **{**common, "dataset": "sharegpt"}, **rest)
