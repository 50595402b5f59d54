"""Automatic prefix caching for the engine: the K/V of full prompt blocks, reused by later prompts.

Chat prompts share their opening: SmolLM2's template puts the same system prompt and user header
(~23 tokens) before every user message, and a multi-turn conversation re-sends its whole history. A
new request copies the K/V of its longest cached run of ``BLOCK``-token blocks into its cache slot and
prefills only the rest (vLLM's automatic prefix caching, on a static cache: copies instead of paged
blocks). Each block is keyed by (its parent block's id, its tokens), so a hit means the whole prefix
matched token for token. Least recently used blocks go first once ``max_bytes`` is exceeded; a lookup
touches a chain from its last block back to its first, so a block is always evicted before its parent.

The reused K/V were computed in another prompt's forward, whose chunk length may pick other GEMM
blockings: they can differ from recomputed ones in the last bits, as in any prefix cache.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch

from zycompile.runtime.kv_cache import StaticKVCache

BLOCK = 16  # tokens per cached block (vLLM's default)
MIN_PREFILL = 2  # tokens left to prefill after a hit: the symbolic-length prefill graph starts at 2


class PrefixCache:
    def __init__(self, cache: StaticKVCache, max_bytes: int, block: int = BLOCK):
        self.cache, self.max_bytes, self.block = cache, max_bytes, block
        # (parent id, block tokens) -> (id, keys [layers, kv_heads, block, head_dim], values)
        self.blocks: OrderedDict[tuple[int, tuple[int, ...]], tuple[int, torch.Tensor, torch.Tensor]] = (
            OrderedDict()
        )
        # every block holds `block` slots of every layer's keys and values
        self.block_bytes = sum(t[0, :, :block].nbytes for t in (*cache.keys, *cache.values))
        self.bytes = 0
        self._ids = itertools.count(1)  # 0: the root every chain starts from
        self.lookup_tokens = self.hit_tokens = 0

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the cache / prompt tokens looked up."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def _span(self, i: int) -> slice:
        return slice(i * self.block, (i + 1) * self.block)

    def _chain(self, prompt: list[int], n: int, slot: int | None = None) -> list[tuple[int, tuple[int, ...]]]:
        """Keys of the first ``n`` blocks of ``prompt``, up to the first one not cached; with ``slot``,
        a missing block is copied out of that cache row instead. The chain is touched from its last
        block back to its first, so the first ends most recent and children are evicted first."""
        chain, parent = [], 0
        for i in range(n):
            key = (parent, tuple(prompt[self._span(i)]))
            entry = self.blocks.get(key)
            if entry is None:
                if slot is None:
                    break
                k = torch.stack([ck[slot, :, self._span(i)] for ck in self.cache.keys])
                v = torch.stack([cv[slot, :, self._span(i)] for cv in self.cache.values])
                entry = self.blocks[key] = (next(self._ids), k, v)
                self.bytes += self.block_bytes
            chain.append(key)
            parent = entry[0]
        for key in reversed(chain):
            self.blocks.move_to_end(key)
        return chain

    def load(self, prompt: list[int], slot: int) -> int:
        """Copy the longest cached block prefix of ``prompt`` into cache row ``slot``, leaving at least
        ``MIN_PREFILL`` tokens to prefill; returns how many prompt tokens it covers."""
        chain = self._chain(prompt, max(len(prompt) - MIN_PREFILL, 0) // self.block)
        for i, key in enumerate(chain):
            _, k, v = self.blocks[key]
            for layer, (ck, cv) in enumerate(zip(self.cache.keys, self.cache.values)):
                ck[slot, :, self._span(i)].copy_(k[layer])
                cv[slot, :, self._span(i)].copy_(v[layer])
        self.lookup_tokens += len(prompt)
        self.hit_tokens += len(chain) * self.block
        return len(chain) * self.block

    def store(self, prompt: list[int], slot: int) -> None:
        """Keep the full blocks of ``prompt``, just prefilled into row ``slot``, that are not cached yet."""
        if self.block_bytes > self.max_bytes:  # not even one block fits
            return
        self._chain(prompt, len(prompt) // self.block, slot)
        while self.bytes > self.max_bytes:
            self.blocks.popitem(last=False)
            self.bytes -= self.block_bytes


def prefix_cache_for(generator) -> PrefixCache | None:
    """The engine's prefix cache, or None where it does not apply: turned off in the recipe
    (``runtime.prefix_cache_mb: 0``), a speculative recipe (its drafter keeps per-prompt state of its
    own), or a cache sharded across ranks."""
    mb = generator.recipe.runtime.prefix_cache_mb
    if mb <= 0 or generator.speculator is not None or type(generator.cache) is not StaticKVCache:
        return None
    return PrefixCache(generator.cache, mb * 2**20)
