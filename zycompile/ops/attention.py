"""``zycompile::attention``: the one attention op every later pass (tree attention, ...) targets.

Shapes: q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, v ``[B, Hkv, Tk, Dv]``; Hq a multiple of Hkv
(GQA/MQA handled inside, no repeat_kv copies). ``mask`` is boolean (True = attend) or additive,
broadcastable to ``[B, Hq, Tq, Tk]``. ``causal`` is bottom-right aligned: query i sees keys
j <= i + (Tk - Tq), which is what a KV cache needs and equals SDPA's rule when Tq == Tk.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from zycompile.ops import cpu_decode_attention
from zycompile.ops.library import define


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool
) -> torch.Tensor:
    if cpu_decode_attention.applies(q, k, v, mask) and (kernel := cpu_decode_attention.load()) is not None:
        return kernel(q, k, v, mask, scale, causal)  # decode/verify: reads each query's visible keys only
    tq, tk = q.shape[-2], k.shape[-2]
    if mask is not None and mask.dtype == torch.bool and not causal and q.device.type == "cpu":
        if tq == tk > 1 and _is_causal(mask):  # a prefill chunk from position 0: the causal kernel
            mask, causal = None, True  # skips the blocks above the diagonal instead of masking them
        else:
            lens, full = _visible_keys(mask)
            if _worth_per_row(q, k, lens):
                return _per_row(q, k, v, mask, scale, lens, full)
            n = max(lens) or mask.shape[-1]
            if n < tk:  # drop the trailing key columns no query may see
                k, v, mask = k[..., :n, :], v[..., :n, :], mask[..., :n]
                tk = n
            if all(full) and min(lens) == n:  # every query sees every key left: nothing to mask
                mask = None  # (SDPA would turn the boolean mask into an additive one on every call)
    if causal and tq != tk:
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        mask = keep if mask is None else _and_masks(mask, keep, q.dtype)
        causal = False
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    ).contiguous()


# A CPU SDPA call's fixed cost (~25 µs here) in key/value bytes it could have read meanwhile (~30 GB/s).
ROW_CALL_BYTES = 768 * 1024


def _visible_keys(mask: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Per batch row of a boolean mask: 1 + the last key column any of its queries may see (0: none),
    and whether every query of the row sees every key column before that (a decode step's prefix).

    A static cache is mostly empty while decoding: columns past these contribute exactly zero, so
    attention may skip reading them. Host-side and data-dependent, hence CPU only (a GPU kernel skips
    empty blocks itself)."""
    b, s = mask.shape[0], mask.shape[-1]
    rows = mask.reshape(b, -1, s).numpy()  # [B, heads x queries, S]; NumPy: ~1 µs an op, not ~4
    cols = rows[:, 0] if rows.shape[1] == 1 else rows.any(1)
    last = np.where(cols.any(1), s - cols[:, ::-1].argmax(1), 0)
    return last.tolist(), (rows.sum((1, 2)) == rows.shape[1] * last).tolist()


def _worth_per_row(q: torch.Tensor, k: torch.Tensor, lens: list[int]) -> bool:
    """Whether one SDPA call per batch row beats one call over the longest row's keys: the rows'
    lengths differ by more key/value bytes than the extra calls cost (one long request among short
    ones in a decode batch makes every row read its keys)."""
    if len(lens) < 2 or len(lens) != q.shape[0] or min(lens) == 0:
        return False
    per_key = 2 * k.shape[1] * k.shape[-1] * k.element_size()
    return (len(lens) * max(lens) - sum(lens)) * per_key > len(lens) * ROW_CALL_BYTES


def _per_row(q, k, v, mask, scale, lens, full) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    out = [
        F.scaled_dot_product_attention(
            q[i : i + 1],
            k[i : i + 1, :, :n],
            v[i : i + 1, :, :n],
            attn_mask=None if full[i] else mask[i : i + 1, ..., :n],
            scale=scale,
            enable_gqa=gqa,
        )
        for i, n in enumerate(lens)
    ]
    return torch.cat(out).contiguous()


def _fake(q, k, v, mask, scale, causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


attention = define(
    "attention",
    "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal) -> Tensor",
    _attention,
    _fake,
)


def _position_mask(keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return keys[None, None, None, :] <= pos[:, None, :, None]


def _position_mask_fake(keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return pos.new_empty((pos.shape[0], 1, pos.shape[1], keys.shape[0]), dtype=torch.bool)


# position_mask(keys, pos): boolean [B, 1, T, S], True where the slot holding global position keys[s]
# is visible to the query at pos[b, t] (causal per row: each row has its own positions).
# An op, not inline math: Inductor treats a compare as free to recompute and fuses a fresh copy of it
# into the producer of every attention call that takes it (30 mask kernels a step for SmolLM2, ~5 ms at
# batch 8 on the 2-core CPU). An op's output is one buffer that every layer reads.
position_mask = define(
    "position_mask", "(Tensor keys, Tensor pos) -> Tensor", _position_mask, _position_mask_fake
)


def _is_causal(mask: torch.Tensor) -> bool:
    """Whether a boolean ``[..., T, T]`` mask is the same lower triangle for every batch row and head."""
    t = mask.shape[-1]
    return torch.equal(mask, torch.ones(t, t, dtype=torch.bool, device=mask.device).tril().expand_as(mask))


def _and_masks(mask: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


def reference_attention(q, k, v, mask=None, scale=None, causal=False) -> torch.Tensor:
    """Plain math attention (fp32 softmax) for tests: the definition the op must match."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    tq, tk = q.shape[-2], k.shape[-2]
    if causal:
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    return (s.softmax(-1) @ v.float()).to(q.dtype)
