"""Static KV cache: preallocated ``[batch, kv_heads, max_seq_len, head_dim]`` per layer, written in place.

It speaks the one method of HF's ``Cache`` that attention layers call (``update``), so HF model code
runs on it unchanged. Every row has its own positions: row b's token at position p lives in slot p
(``write_pos[b, t]``), so prompts of different lengths need no left padding and rows can join and
leave independently (the batching engine's slots). Sequence sharding across ranks (tree attention)
maps a global position to (rank, local slot); ``slot_of`` is the single place that mapping lives.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    is_compileable = True
    can_move_rows = True  # slot p of a row holds position p: a row's first n slots are its first n tokens

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        v_head_dim: int | None = None,
    ):
        self.batch, self.max_seq_len = batch, max_seq_len
        shape_k = (batch, kv_heads, max_seq_len, head_dim)
        shape_v = (batch, kv_heads, max_seq_len, v_head_dim or head_dim)
        self.keys = [torch.zeros(shape_k, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape_v, dtype=dtype, device=device) for _ in range(num_layers)]
        for t in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(t)  # fixed addresses: no recompiles, CUDA-graph friendly
        self.write_pos: torch.Tensor | None = None  # [B, T] positions of the tokens of the current step
        # [B] cache rows of the step's sequences, or None for rows 0..B-1 (decode reads them as a view;
        # the engine's prefill of one request into slot s passes rows=[s] and reads a gathered copy).
        self.rows: torch.Tensor | None = None
        # [S'] key positions of the slots the step reads, a prefix of key_positions (None: every slot):
        # a prefill chunk ending at position p needs only slots [0, p], not the whole empty row.
        self.read_keys: torch.Tensor | None = None
        # [N] cache row of each token of a mixed step's single flat sequence (runtime/mixed_step.py), or
        # None: update then writes token t at (token_rows[t], write_pos[0, t]) and returns the whole cache.
        self.token_rows: torch.Tensor | None = None
        # Global position held by each slot (the mask compares these with query positions).
        self.key_positions = torch.arange(max_seq_len, device=device)

    @classmethod
    def for_model(
        cls,
        config,
        batch: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device="cpu",
        head_shards: int = 1,
        **kwargs,
    ):
        """A cache shaped for ``config``'s decoder (``head_shards``: TP ranks splitting the KV heads);
        ``kwargs`` go to subclasses (sequence sharding)."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            text.num_hidden_layers,
            batch,
            kv_heads // head_shards,
            max_seq_len,
            head_dim,
            dtype,
            device,
            **kwargs,
        )

    def slot_of(self, pos: torch.Tensor) -> torch.Tensor:
        return pos

    def set_step(
        self, pos: torch.Tensor, rows: torch.Tensor | None = None, keys: torch.Tensor | None = None
    ) -> None:
        """What the next forward does: writes ``pos`` [B, T] into ``rows`` and reads the slots of ``keys``."""
        self.write_pos, self.rows, self.read_keys, self.token_rows = pos, rows, keys, None

    def set_mixed_step(self, pos: torch.Tensor, token_rows: torch.Tensor) -> None:
        """The next forward is a mixed step: one flat sequence, token t written at (token_rows[t], pos[0, t])."""
        self.write_pos, self.rows, self.read_keys, self.token_rows = pos, None, None, token_rows

    def prefix_keys(self, n: int) -> torch.Tensor | None:
        """Key positions of the slots holding positions [0, n), when they are the first slots; else None."""
        return self.key_positions[:n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this step's K/V at ``write_pos`` and return the cache rows the step attends over."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.token_rows is not None:  # a mixed step: [1, H, N, D], each token in its own row
            slots = self.slot_of(self.write_pos[0])
            k[self.token_rows, :, slots] = key_states[0].transpose(0, 1).to(k.dtype)
            v[self.token_rows, :, slots] = value_states[0].transpose(0, 1).to(v.dtype)
            return k, v
        b = key_states.shape[0]
        rows = torch.arange(b, device=key_states.device) if self.rows is None else self.rows
        slots = self.slot_of(self.write_pos)
        # x[rows, :, slots] has shape [B, T, H, D]: heads move behind the advanced indices.
        k[rows[:, None], :, slots] = key_states.transpose(1, 2).to(k.dtype)
        v[rows[:, None], :, slots] = value_states.transpose(1, 2).to(v.dtype)
        if self.read_keys is not None:  # views: the row gather below then copies only these slots
            n = self.read_keys.shape[0]
            k, v = k[:, :, :n], v[:, :, :n]
        if self.rows is None:
            return k[:b], v[:b]
        return k.index_select(0, rows), v.index_select(0, rows)

    def move_row(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` slots of row ``src`` to row ``dst`` (the engine compacting its batch)."""
        for t in (*self.keys, *self.values):
            t[dst, :, :n].copy_(t[src, :, :n])

    def move_slots(self, rows: list[int], src: list[int], dst: list[int]) -> None:
        """Slot ``src[i]`` of row ``rows[i]`` to slot ``dst[i]`` (a draft tree's accepted path moving to
        consecutive positions); every source is read before any slot is written."""
        r, s, d = (torch.tensor(x, device=self.key_positions.device) for x in (rows, src, dst))
        for t in (*self.keys, *self.values):
            t[r, :, d] = t[r, :, s]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are passed explicitly; HF never needs to infer them from us

    def reset(self) -> None:
        for t in (*self.keys, *self.values):
            t.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
