"""Model bandwidth utilisation: bytes a decode step must read, and the machine's measured read bandwidth."""

from __future__ import annotations

import functools
import time

import torch


def weight_bytes_per_token(model: torch.nn.Module, stored=None) -> int:
    """Bytes of weights one decode step reads: every parameter once, except input embeddings
    (one row per token) unless they are tied to the LM head (then the head reads them all).
    ``stored(p)``: the bytes the kernels keep of ``p`` instead, where they keep a smaller copy
    (``cpu_kernels.coded_bytes``), else None."""
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
        kept = stored(p) if stored is not None else None
        total += kept if kept is not None else p.numel() * p.element_size()
    return total


def _text_config(config):
    """The decoder's config (a multimodal config nests it)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def kv_bytes_per_token(config, context_len: float, dtype: torch.dtype) -> float:
    """Bytes of KV cache one decode step of one sequence reads at ``context_len`` tokens of context."""
    text = _text_config(config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * kv_heads * head_dim * elem * context_len


@functools.lru_cache(maxsize=4)
def measure_read_bandwidth(device: str = "cpu", nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a sum over a buffer far larger than the caches), best of ``repeats``."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / _best_seconds(x.sum, device, repeats)


def _best_seconds(fn, device: str, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn`` after one warm-up (device work synchronised)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def mbu(bytes_per_step: float, steps_per_s: float, bandwidth: float) -> float:
    return bytes_per_step * steps_per_s / bandwidth


def prefill_flops(model: torch.nn.Module, prompt_len: int, cached: int = 0) -> float:
    """FLOPs of prefilling one ``prompt_len``-token prompt whose first ``cached`` tokens' K/V came from
    the prefix cache: every linear but the LM head once per computed token, causal attention's two
    products for the computed queries, and the LM head for the last token only (what TTFT waits for).
    A dense count: an MoE model's linears are all counted, as if every expert ran."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    )
    text = _text_config(model.config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    # query-key pairs under a causal mask, queries [cached, prompt_len): query i sees i + 1 keys
    pairs = (prompt_len * (prompt_len + 1) - cached * (cached + 1)) / 2
    attn = 2 * 2 * text.num_hidden_layers * text.num_attention_heads * head_dim * pairs
    return 2 * linear * (prompt_len - cached) + attn + (2 * head.weight.numel() if head is not None else 0)


@functools.lru_cache(maxsize=4)
def measure_matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 3) -> float:
    """FLOP/s of a large square matmul in ``dtype`` (2048 on CPU, 8192 on GPU), best of ``repeats``:
    the compute ceiling a prefill (TTFT) can approach on this machine."""
    n = 2048 if device == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / _best_seconds(lambda: a @ b, device, repeats)
