"""Model bandwidth utilisation: bytes a decode step must read, and the machine's measured read bandwidth."""

from __future__ import annotations

import functools
import time

import torch


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once, except input embeddings
    (one row per token) unless they are tied to the LM head (then the head reads them all)."""
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    emb_ptr = local(emb).data_ptr() if emb is not None else None
    tied = head is not None and emb is not None and local(head.weight).data_ptr() == emb_ptr
    seen, total = set(), 0
    for p in model.parameters():
        p = p.to_local() if hasattr(p, "to_local") else p  # a TP shard: this rank reads its part
        key = (p.untyped_storage().data_ptr(), p.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        if emb is not None and p.data_ptr() == emb_ptr and not tied:
            continue
        total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(config, context_len: float, dtype: torch.dtype) -> float:
    """Bytes of KV cache one decode step of one sequence reads at ``context_len`` tokens of context."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * kv_heads * head_dim * elem * context_len


@functools.lru_cache(maxsize=4)
def measure_read_bandwidth(device: str = "cpu", nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a sum over a buffer far larger than the caches), best of ``repeats``."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum()
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def mbu(bytes_per_step: float, steps_per_s: float, bandwidth: float) -> float:
    return bytes_per_step * steps_per_s / bandwidth
