"""TSP's prefill attention without a position mask: zigzag chunks, flash calls per key chunk, log-sum-exp
merge; compared to plain causal attention over the whole prompt (one process: no ranks needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zycompile.ops.tree_attention import attention_lse, merge_online, merge_pair
from zycompile.parallel.tsp_layers import zigzag, zigzag_attention

SCALE = 0.3


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("tokens", [1, 11, 24])  # 1 and 11: not multiples of 2D, the chunk pads
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_zigzag_attention_equals_causal_attention(world, tokens, heads):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(world * 100 + tokens)
    padded = -(-tokens // (2 * world)) * (2 * world)
    q, k, v = (torch.randn(2, h, padded, 16, generator=gen) for h in (hq, hkv, hkv))
    real = slice(0, tokens)  # what one process sees: no padding at all
    want = F.scaled_dot_product_attention(
        q[:, :, real], k[:, :, real], v[:, :, real], is_causal=True, scale=SCALE, enable_gqa=True
    )
    scores = q[:, :, real] @ k[:, :, real].repeat_interleave(hq // hkv, 1).transpose(-1, -2) * SCALE
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    want_lse = scores.masked_fill(~causal, float("-inf")).logsumexp(-1)
    idx = [zigzag(padded, world, r) for r in range(world)]
    kv = torch.stack([torch.stack([k[:, :, i], v[:, :, i]]) for i in idx])  # what the all-gather returns
    covered = torch.zeros(tokens, dtype=torch.bool)
    for r in range(world):
        out, lse = zigzag_attention(q[:, :, idx[r]], kv, r, SCALE)
        assert out.shape == (2, hq, len(idx[r]), 16) and torch.isfinite(out).all()
        mine = idx[r] < tokens  # this rank's real queries (the rest is padding)
        torch.testing.assert_close(out[:, :, mine], want[:, :, idx[r][mine]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[:, :, mine], want_lse[:, :, idx[r][mine]], rtol=1e-5, atol=1e-5)
        covered[idx[r][mine]] = True
    assert covered.all()


def test_attention_lse_and_online_merge_match_the_stacked_merge():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, t, 8, generator=gen) for h, t in ((6, 5), (2, 12), (2, 12)))
    whole = attention_lse(q, k, v, SCALE, False)
    first = attention_lse(q, k[:, :, :7], v[:, :, :7], SCALE, False)
    second = attention_lse(q, k[:, :, 7:], v[:, :, 7:], SCALE, False)
    for got in (merge_online(*first, *second), merge_pair(*first, *second)):
        torch.testing.assert_close(got[0], whole[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], whole[1], rtol=1e-5, atol=1e-5)
    # a part that saw no key (lse -inf, output 0) weighs nothing; two such parts merge to one
    blind = (torch.zeros_like(first[0]), torch.full_like(first[1], float("-inf")))
    for a, b, want in ((first, blind, first), (blind, first, first), (blind, blind, blind)):
        for got in (merge_online(*a, *b), merge_pair(*a, *b)):
            torch.testing.assert_close(got[0].float(), want[0].float(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    # causal is top-left: on a square block it is plain causal attention
    sq = attention_lse(q, k[:, :, :5], v[:, :, :5], SCALE, True)[0]
    ref = F.scaled_dot_product_attention(
        q, k[:, :, :5], v[:, :, :5], is_causal=True, scale=SCALE, enable_gqa=True
    )
    torch.testing.assert_close(sq, ref, rtol=1e-5, atol=1e-5)
