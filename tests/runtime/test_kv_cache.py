"""Static KV cache: writes land at each row's positions; a prefill chunk reads only the slots it needs."""

from __future__ import annotations

import torch

from zycompile.runtime.kv_cache import StaticKVCache
from zycompile.runtime.sharded_kv_cache import SeqShardedKVCache

HEADS, DIM, SEQ = 2, 4, 32


def _chunk(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, HEADS, t, DIM, generator=g), torch.randn(1, HEADS, t, DIM, generator=g)


def test_prefill_chunk_into_a_slot_reads_only_the_prefix():
    cache = StaticKVCache(1, 4, HEADS, SEQ, DIM, torch.float32)
    row = torch.tensor([2])
    k0, v0 = _chunk(5, 0)
    cache.set_step(torch.arange(5)[None], row, cache.prefix_keys(5))
    k, v = cache.update(k0, v0, 0)
    assert k.shape == v.shape == (1, HEADS, 5, DIM)  # not the whole 32-slot row
    torch.testing.assert_close(k, k0, rtol=0, atol=0)
    k1, v1 = _chunk(3, 1)  # the next chunk (start 5) sees the first one's K/V, then its own
    cache.set_step(torch.arange(5, 8)[None], row, cache.prefix_keys(8))
    k, v = cache.update(k1, v1, 0)
    assert k.shape == (1, HEADS, 8, DIM)
    torch.testing.assert_close(k, torch.cat([k0, k1], 2), rtol=0, atol=0)
    torch.testing.assert_close(v, torch.cat([v0, v1], 2), rtol=0, atol=0)
    # the write went to row 2 only; the other rows stay empty
    assert cache.keys[0][[0, 1, 3]].abs().sum() == 0
    torch.testing.assert_close(cache.keys[0][2, :, :8], torch.cat([k0, k1], 2)[0], rtol=0, atol=0)


def test_without_read_keys_every_slot_is_read():
    cache = StaticKVCache(1, 2, HEADS, SEQ, DIM, torch.float32)
    k0, v0 = _chunk(1, 2)
    cache.set_step(torch.tensor([[7]]), torch.tensor([1]))  # decode-style: no read_keys
    assert cache.update(k0, v0, 0)[0].shape == (1, HEADS, SEQ, DIM)
    cache.set_step(torch.tensor([[7], [3]]))  # rows 0..B-1: a view of the first B rows, all slots
    assert cache.update(torch.cat([k0, k0]), torch.cat([v0, v0]), 0)[0].shape == (2, HEADS, SEQ, DIM)


def test_sequence_sharded_slices_have_no_prefix_of_positions():
    cache = SeqShardedKVCache(1, 1, HEADS, SEQ, DIM, torch.float32, rank=1, world=2)
    assert cache.prefix_keys(10) is None  # the runtime then reads all slots, as before
