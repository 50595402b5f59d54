"""What one rank holds: weight bytes (DTensor shards count their local part) and KV-cache bytes."""

from __future__ import annotations

import torch

from zycompile.parallel.tp import local_bytes


def rank_memory(model: torch.nn.Module, cache=None) -> dict[str, int]:
    seen, weights = set(), 0
    for p in model.parameters():  # tied weights counted once
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.data_ptr() in seen:
            continue
        seen.add(local.data_ptr())
        weights += local_bytes(p)
    return {"weights": weights, "kv_cache": cache.nbytes() if cache is not None else 0}
