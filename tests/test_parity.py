"""Parity: optimize() with both passes gives the eager model's logits and greedy tokens (fp32)."""

from __future__ import annotations

import pytest
import torch

import zycompile
from zycompile.models import load_model

MODELS = ["tiny:llama", "tiny:qwen3", "tiny:mistral"]
PROMPT_LEN, NEW_TOKENS = 4, 16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _logits(fn, ids):
    with torch.no_grad():
        return fn(input_ids=ids, use_cache=False).logits


def greedy_eager(model, prompt, n):
    """The reference: no KV cache, the model called on the growing sequence."""
    ids = prompt
    for _ in range(n):
        nxt = _logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompt.shape[1] :]


def greedy_fixed_window(fn, prompt, n):
    """The same greedy decode, one compiled shape: the sequence lives in a window of its final length,
    right-padded. Causal attention makes position t depend on tokens <= t only, so the padding never
    changes a prediction (the eager reference above checks that), and the compiled model is traced
    once instead of once per length (each recompile costs ~3 s here)."""
    p = prompt.shape[1]
    window = torch.zeros(prompt.shape[0], p + n, dtype=prompt.dtype)
    window[:, :p] = prompt
    for t in range(p, p + n):
        window[:, t] = _logits(fn, window)[:, t - 1].argmax(-1)
    return window[:, p:]


@pytest.mark.parametrize("source", MODELS)
def test_optimize_matches_eager(source):
    model = load_model(source).model
    layers = model.config.num_hidden_layers
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, PROMPT_LEN + NEW_TOKENS), generator=g)
    prompt = torch.randint(0, vocab, (1, PROMPT_LEN), generator=g)
    expected_logits = _logits(model, ids)
    expected_tokens = greedy_eager(model, prompt, NEW_TOKENS)

    opt = zycompile.optimize(model, "llama-tiny", overrides=["lowering.backend=aot_eager"])
    torch.testing.assert_close(_logits(opt, ids), expected_logits)  # fp32: default (tight) tolerances
    tokens = greedy_fixed_window(opt, prompt, NEW_TOKENS)
    assert tokens.tolist() == expected_tokens.tolist()

    report = opt.compile_report()
    assert len(report.graphs) == 1 and not report.graph_breaks  # one shape, one graph
    assert report.matches("canonicalize_attention") == layers
    assert report.matches("fuse_projections") == 2 * layers
    assert report.warnings == []
    assert report.graphs[0].lowering == "aot_eager"


def test_greedy_window_equals_growing_sequence():
    """The fixed window is the growing-sequence decode (checked eagerly, where it costs nothing)."""
    model = load_model("tiny:llama").model
    prompt = torch.randint(
        0, model.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1)
    )
    assert greedy_fixed_window(model, prompt, 8).tolist() == greedy_eager(model, prompt, 8).tolist()


@pytest.mark.inductor
def test_inductor_end_to_end_llama():
    model = load_model("tiny:llama").model
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = _logits(model, ids)
    opt = zycompile.optimize(model, "llama-tiny")  # lowering.backend: inductor, debug.strict: true
    torch.testing.assert_close(_logits(opt, ids), expected, rtol=1e-4, atol=1e-4)
    report = opt.compile_report()
    assert [g.lowering for g in report.graphs] == ["inductor"]
    assert report.matches("canonicalize_attention") == layers
    assert report.matches("fuse_projections") == 2 * layers
