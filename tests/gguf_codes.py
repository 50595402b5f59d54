"""fp32 weights as a GGUF checkpoint holds them after dequantization: random values through ggml's
Q4_1 / Q8_0 quantizers (blocks of 32 along K), then gguf-py's dequantization in fp32."""

from __future__ import annotations

import numpy as np
import torch


def q4_1(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random weights through ggml's Q4_1 quantizer and gguf-py's dequantization ((d * q) + m in fp32)."""
    x = np.random.default_rng(seed).normal(0, 0.05, (n, k // 32, 32)).astype(np.float32)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    q = np.minimum(15, ((x - lo) / ((hi - lo) / 15) + 0.5).astype(np.int32)).astype(np.float32)
    d16 = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
    return torch.from_numpy(((d16 * q) + lo.astype(np.float16).astype(np.float32)).reshape(n, k))


def q8_0(n: int, k: int, seed: int = 0) -> torch.Tensor:
    x = np.random.default_rng(seed).normal(0, 0.05, (n, k // 32, 32)).astype(np.float32)
    d = np.abs(x).max(-1, keepdims=True) / 127
    return torch.from_numpy((d.astype(np.float16).astype(np.float32) * np.round(x / d)).reshape(n, k))
