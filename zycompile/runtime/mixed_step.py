"""Mixed steps: one forward that decodes every row of a batch bucket and prefills a chunk of one prompt.

vLLM's chunked prefill: a waiting prompt's chunk rides in the decode step's GEMMs (M = batch + chunk
rows over one weight stream) instead of paying for a weight stream of its own. It pays where a decode
step leaves the FMA units idle while it streams weights (a GPU at small batch). On the 2-core EPYC it
does not: a batch-8 fp32 decode step already runs its GEMMs near the FMA peak, so a prompt token costs
about as much inside a decode step (~1.56 ms) as in a 256-token chunk of its own (~1.55 ms), and
prompts fed 8 tokens a step hold their slots longer. The 64-prompt c=8 bench measured 115.7 and
107.3 tok/s with ``runtime.mixed_prefill_tokens: 8`` against 153.8 and 162.4 without (bench/RESULTS.md
notes of 2026-11-29 16:4x-17:4x). Off by default; opt in where ``zycompile bench`` says it pays.

The tokens are laid out flat, ``[1, B + C]``: the B decode tokens (row b's at its next position,
idle rows at an ignored one, as in a decode step) then the chunk's C tokens of cache row ``s``
(padding after a short last chunk). Every token's K/V is written at its own (cache row, position), and
attention runs as two calls of ``zycompile::attention`` over the cache's rows: the decode queries one
per row, and the chunk's queries against row ``s`` only (the other rows' mask rows are empty, so the
CPU kernel reads nothing for them; no copy of row ``s`` is made).

HF models reach attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``; the
``zycompile`` entry registered here is SDPA's function unless the call carries a ``MixedLayout``
(passed down through the decoder's keyword arguments), so every other graph traces as before.
"""

from __future__ import annotations

import dataclasses

import torch

from zycompile.ops.attention import attention, position_mask

ATTN_IMPLEMENTATION = "zycompile"


@dataclasses.dataclass
class MixedLayout:
    """What the attention calls of a mixed step need besides q/k/v (tensors made inside the step)."""

    decode_rows: int  # B: the first B tokens are one decode token per cache row 0..B-1
    decode_mask: torch.Tensor  # [B, 1, 1, S] bool: keys each decode query sees
    chunk_mask: torch.Tensor  # [B, 1, C, S] bool: keys each chunk query sees (all false but row s)
    chunk_row: torch.Tensor  # [1] cache row of the chunk


def mixed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """HF attention-interface function: a mixed step's split attention, else SDPA's function."""
    layout = kwargs.get("zy_mixed")
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    b = layout.decode_rows
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    k, v = key[:b], value[:b]  # the cache's rows 0..B-1 (update returned the whole cache)
    q_dec = query[0, :, :b].transpose(0, 1).unsqueeze(2)  # [B, Hq, 1, D]
    out_dec = attention(q_dec, k, v, layout.decode_mask, scale, False)
    q_chunk = query[:, :, b:].expand(b, -1, -1, -1)  # [B, Hq, C, D], a view: rows other than s see no key
    out_chunk = attention(q_chunk, k, v, layout.chunk_mask, scale, False).index_select(0, layout.chunk_row)
    out = torch.cat([out_dec.squeeze(2).transpose(0, 1).unsqueeze(0), out_chunk], dim=2)  # [1, Hq, N, Dv]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``zycompile`` an attention implementation HF models can be switched to (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, mixed_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # masks as SDPA's, when HF builds them


def why_not(gen) -> str | None:
    """None when ``gen`` can run mixed steps, else why not (the engine then prefills chunks alone)."""
    from zycompile.runtime.kv_cache import StaticKVCache

    if gen.speculator is not None:
        return "the recipe speculates (a verify round is its own step)"
    if type(gen.cache) is not StaticKVCache:
        return f"the KV cache is a {type(gen.cache).__name__} (mixed steps need the plain static cache)"
    if gen.decoder is None or not gen._can_split_head():
        return "the model has no separate decoder and linear LM head"
    impl = getattr(gen.model.config, "_attn_implementation", None)
    if impl not in ("sdpa", ATTN_IMPLEMENTATION):
        return f"the model's attention implementation is {impl!r} (mixed steps replace 'sdpa')"
    return None


def layout_for(
    keys: torch.Tensor, pos: torch.Tensor, chunk_visible: torch.Tensor, chunk_row: torch.Tensor
) -> MixedLayout:
    """The step's layout from its inputs: ``pos`` [1, B + C] (decode tokens first), ``chunk_visible``
    [B, C] (the position each chunk query attends up to, in its row; -1: none)."""
    b = chunk_visible.shape[0]
    return MixedLayout(
        decode_rows=b,
        decode_mask=position_mask(keys, pos[0, :b, None]),
        chunk_mask=position_mask(keys, chunk_visible),
        chunk_row=chunk_row,
    )


def inputs(
    decode_ids: torch.Tensor,
    decode_pos: torch.Tensor,
    chunk: list[int],
    start: int,
    width: int,
    row: int,
    max_seq_len: int,
) -> dict[str, torch.Tensor]:
    """The step's arguments (CPU tensors): decode tokens ``decode_ids``/``decode_pos`` [B] for rows
    0..B-1, then ``chunk`` (<= ``width`` tokens of cache row ``row`` from position ``start``), padded to
    ``width`` with tokens written past the chunk (positions its later chunks or first decode step write
    before anything reads them) whose queries see nothing."""
    b, c = decode_ids.shape[0], len(chunk)
    if not 0 < c <= width:
        raise ValueError(f"mixed step: a chunk of 1..{width} tokens expected, got {c}")
    ids = torch.zeros(1, b + width, dtype=torch.long)
    ids[0, :b] = decode_ids
    ids[0, b : b + c] = torch.tensor(chunk, dtype=torch.long)
    chunk_pos = (torch.arange(width) + start).clamp(max=max_seq_len - 1)
    pos = torch.cat([decode_pos, chunk_pos])[None]
    rows = torch.cat([torch.arange(b), torch.full((width,), row)])
    visible = torch.full((b, width), -1, dtype=torch.long)
    visible[row, :c] = chunk_pos[:c]
    last = torch.cat([torch.arange(b), torch.tensor([b + c - 1])])
    return {
        "input_ids": ids,
        "pos": pos,
        "rows": rows,
        "chunk_visible": visible,
        "chunk_row": torch.tensor([row]),
        "last": last,
    }
