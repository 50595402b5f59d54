"""This rank's slice of a KV cache sharded along the sequence (tree / ring attention's input).

Each of the ``world`` ranks of the sequence group holds ``ceil(max_seq_len / world)`` slots, plus
one trash slot. ``round_robin`` (default) puts position p on rank ``p % world``: appended decode
tokens rotate over the ranks, so their slices stay balanced within one token whatever the length.
``contiguous`` gives rank r positions ``[r*L, (r+1)*L)``. Every rank runs the same step on the same
tokens; a rank writes only the positions it owns, and the others' writes land in the trash slot,
whose key position is never visible, so no rank-dependent shapes enter the compiled graph.
"""

from __future__ import annotations

import torch

from zycompile.runtime.kv_cache import StaticKVCache

NEVER = 2**40  # key position of unused / trash slots: larger than any query position
LAYOUTS = ("round_robin", "contiguous")


class SeqShardedKVCache(StaticKVCache):
    can_move_rows = False  # a row's positions are spread over ranks' slots: not a prefix to copy

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        *,
        rank: int,
        world: int,
        layout: str = "round_robin",
        v_head_dim: int | None = None,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"KV layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a sequence group of {world}")
        local = -(-max_seq_len // world)
        super().__init__(num_layers, batch, kv_heads, local + 1, head_dim, dtype, device, v_head_dim)
        self.global_len, self.local_len = max_seq_len, local
        self.rank, self.world, self.layout = rank, world, layout
        self.key_positions = self.positions_of(rank, device)

    def positions_of(self, rank: int, device=None) -> torch.Tensor:
        """Global position held by each slot (trash slot last) of ``rank``'s slice; unused slots: NEVER."""
        local, world = self.local_len, self.world
        slots = torch.arange(local, device=device)
        pos = slots * world + rank if self.layout == "round_robin" else rank * local + slots
        pos = torch.where(pos < self.global_len, pos, torch.full_like(pos, NEVER))
        return torch.cat([pos, torch.tensor([NEVER], device=device)])

    def prefix_keys(self, n: int) -> None:
        return None  # this rank's slots of positions [0, n) are not a prefix of its slice in general

    def owner_of(self, pos: torch.Tensor) -> torch.Tensor:
        return pos % self.world if self.layout == "round_robin" else pos // self.local_len

    def slot_of(self, pos: torch.Tensor) -> torch.Tensor:
        local = pos // self.world if self.layout == "round_robin" else pos % self.local_len
        return torch.where(self.owner_of(pos) == self.rank, local, torch.full_like(local, self.local_len))


def cache_for_recipe(recipe, config, batch: int, dtype: torch.dtype, device) -> StaticKVCache:
    """The runtime's cache: this rank's sequence slice when the recipe shards the KV, else the whole one."""
    rt, par = recipe.runtime, recipe.parallel
    if par.mode == "tp":  # each rank holds its own KV heads
        return StaticKVCache.for_model(config, batch, rt.max_seq_len, dtype, device, head_shards=par.degree)
    if par.mode not in ("sp", "tsp"):
        return StaticKVCache.for_model(config, batch, rt.max_seq_len, dtype, device)
    from zycompile.parallel.distributed import sequence_group

    group = sequence_group()
    return SeqShardedKVCache.for_model(
        config, batch, rt.max_seq_len, dtype, device,
        rank=group.rank(), world=group.size(), layout=par.kv_layout,
    )  # fmt: skip
