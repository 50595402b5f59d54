"""``zycompile train-draft``'s unrolled forward (EAGLE-3's training-time test) computes what drafting
computes: depth s at index i equals the head's s-th draft call after a catch-up over entries 0..i."""

from __future__ import annotations

import contextlib

import pytest
import torch

from zycompile.models import load_model
from zycompile.runtime.eagle import EagleHead
from zycompile.train_draft import _ChainKV, unrolled


@pytest.fixture(scope="module")
def tiny():
    model = load_model("tiny:llama").model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = EagleHead(model.config, type(model.model.layers[0]), torch.arange(0, 512, 2)).eval()
        ids = torch.randint(0, 512, (2, 12))
        feats = torch.randn(2, 12, model.config.hidden_size)
    return model.model, head, ids, feats


def _drafting(decoder, head, ids, feats, end: int, depth: int) -> list[torch.Tensor]:
    """The drafter's calls for a context x_0..x_end: a catch-up over the target's entries 0..end-1
    (entry p = (f_p, x_{p+1}) at position p), then one call per further draft, each fed the last
    call's output and the true next token, at the next position; every call attends causally over
    the head cache's positions, as ``EagleDrafter._draft`` does."""
    kv, outs = _ChainKV(), []
    pos = torch.arange(end)[None].expand(len(ids), end)
    emb = decoder.embed_tokens(ids[:, 1 : end + 1])
    mask = torch.ones(end, end, dtype=torch.bool).tril()[None, None]
    g = head(feats[:, :end], emb, mask, pos, decoder.rotary_emb(emb, pos), kv)[:, -1:]
    outs.append(g[:, 0])
    for s in range(2, depth + 1):
        p = torch.full((len(ids), 1), end + s - 2)
        emb = decoder.embed_tokens(ids[:, end + s - 1 : end + s])
        mask = torch.ones(1, end + s - 1, dtype=torch.bool)[None, None]
        g = head(g, emb, mask, p, decoder.rotary_emb(emb, p), kv)
        outs.append(g[:, 0])
    return outs


@pytest.mark.parametrize("end", [1, 4, 8])
def test_unrolled_depths_match_drafting(tiny, end):
    decoder, head, ids, feats = tiny
    with torch.no_grad():
        steps = unrolled(head, decoder, ids, feats, 3, False, contextlib.nullcontext())
        want = _drafting(decoder, head, ids, feats, end, 3)
    assert [g.shape[1] for g, _ in steps] == [11, 10, 9]
    for s, ((g, target), ref) in enumerate(zip(steps, want), 1):
        torch.testing.assert_close(g[:, end - 1], ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(target[:, end - 1], feats[:, end + s - 1])  # f at the drafted slot


def test_unrolled_depths_differ_from_teacher_forcing(tiny):
    """Depth 2 is fed the head's own output, not the target's feature: a wrong mask or feature
    source that reduced it to depth 1's computation would make these equal."""
    decoder, head, ids, feats = tiny
    with torch.no_grad():
        (g1, _), (g2, _) = unrolled(head, decoder, ids, feats, 2, False, contextlib.nullcontext())
    assert not torch.allclose(g1[:, 1:], g2, atol=1e-3)


def test_unrolled_backpropagates_through_the_chain(tiny):
    decoder, head, ids, feats = tiny
    head.train().requires_grad_(True)
    try:
        (_, _), (g2, _) = unrolled(head, decoder, ids, feats, 2, True, contextlib.nullcontext())
        g2.sum().backward()
        assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0
    finally:
        head.eval().requires_grad_(False)
        head.zero_grad(set_to_none=True)
