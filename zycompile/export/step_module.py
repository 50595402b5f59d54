"""The runtime's step as an exportable module: KV cache and key positions as buffers, mutated in place.

``torch.export`` only treats tensors reached through the exported module as state; the HF model
reaches the cache through our ``StaticKVCache`` object, so ``forward`` points the cache at this
module's buffers before calling the generator's step (and ``exported`` puts the real ones back).
The result: one program per shape whose cache writes are in-place buffer updates, which an
AOTInductor package applies to the cache tensors the loader hands it.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.export import Dim

CACHE_K, CACHE_V, KEY_POS = "cache_k{}", "cache_v{}", "key_positions"


class StepModule(torch.nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.gen = gen
        self.model = gen.model
        cache = gen.cache
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            self.register_buffer(CACHE_K.format(i), k, persistent=False)
            self.register_buffer(CACHE_V.format(i), v, persistent=False)
        self.register_buffer(KEY_POS, cache.key_positions, persistent=False)
        self.layers = len(cache.keys)

    def forward(self, input_ids: torch.Tensor, pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        cache = self.gen.cache
        cache.keys = [getattr(self, CACHE_K.format(i)) for i in range(self.layers)]
        cache.values = [getattr(self, CACHE_V.format(i)) for i in range(self.layers)]
        cache.key_positions = getattr(self, KEY_POS)
        return self.gen._step(input_ids, pos, last)


@contextlib.contextmanager
def _restore_cache(cache):
    saved = (cache.keys, cache.values, cache.key_positions)
    try:
        yield
    finally:
        cache.keys, cache.values, cache.key_positions = saved


@dataclasses.dataclass
class Program:
    """One exported step and what it was exported from (the recipe's passes export it again)."""

    ep: torch.export.ExportedProgram
    args: tuple
    dynamic_shapes: dict | None = None


def export_programs(gen) -> dict[str, Program]:
    """``decode_b{B}`` per batch bucket (static shapes) and ``prefill`` (dynamic batch and length)."""
    module = StepModule(gen).eval()
    dev = gen.device
    programs = {}
    with torch.no_grad(), _restore_cache(gen.cache):
        for b in gen.batch_buckets:
            ids = torch.ones(b, 1, dtype=torch.long, device=dev)
            args = (ids, torch.ones_like(ids), torch.zeros(b, dtype=torch.long, device=dev))
            programs[f"decode_b{b}"] = Program(torch.export.export(module, args, strict=False), args)
        chunk = gen.prefill_buckets[-1]
        top = gen.batch_buckets[-1]
        b, t = min(2, top), min(4, chunk)
        ids = torch.ones(b, t, dtype=torch.long, device=dev)
        args = (
            ids,
            torch.arange(t, device=dev).expand(b, t).contiguous(),
            torch.zeros(b, dtype=torch.long, device=dev),
        )
        batch = Dim("batch", min=1, max=top) if top > 1 else Dim.STATIC
        length = Dim("length", min=2, max=chunk)
        shapes = {"input_ids": {0: batch, 1: length}, "pos": {0: batch, 1: length}, "last": {0: batch}}
        ep = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
        programs["prefill"] = Program(ep, args, shapes)
    return programs
