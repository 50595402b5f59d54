"""Triton GEMM ``y = x @ w.T (+ b)`` with tile sizes and split-K as parameters: the GPU tuning candidates.

``zycompile tune`` on CUDA/ROCm times a sweep of tile configs (``candidates.TRITON_CONFIGS``) against
cuBLAS/hipBLASLt (``aten``). Skinny decode GEMMs (M of 1-8 rows against a wide K) leave most of a GPU
idle with one program per output tile; split-K gives each tile ``SPLIT_K`` programs over slices of K,
whose fp32 partials are summed afterwards (a second, tiny reduction, deterministic unlike atomics).
fp32 inputs use IEEE products, not TF32, so a candidate matches the default numerically.

GPU kernels; on CPU they run under Triton's interpreter (``TRITON_INTERPRET=1`` set before this
module is imported), which is how the tests check them against ``F.linear``.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton have no GPU candidates
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def usable(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or INTERPRET)


if triton is not None:

    @triton.jit
    def _mm_kernel(
        X, W, P,
        M, N, K, k_per_split,
        sxm, sxk, swn, swk, sps, spm, spn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):
            rk = k_lo + k0 + tl.arange(0, BLOCK_K)
            in_k = rk < k_hi
            x = tl.load(
                X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & in_k[None, :], other=0.0
            )
            w = tl.load(
                W + rn[None, :] * swn + rk[:, None] * swk, mask=(rn[None, :] < N) & in_k[:, None], other=0.0
            )
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        out = P + split * sps + rm[:, None] * spm + rn[None, :] * spn
        tl.store(out, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 64,
    split_k: int = 1,
) -> torch.Tensor:
    """``x [M, K] @ w[N, K].T + b`` in x's dtype; fp32 accumulation, any strides of ``w`` (K-major too)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    m, k = x.shape
    n = w.shape[0]
    k_per = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k  # whole BLOCK_K steps per split
    splits = triton.cdiv(k, k_per)
    part = torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    _mm_kernel[grid](
        x, w, part, m, n, k, k_per,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), part.stride(0), part.stride(1), part.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
    )  # fmt: skip
    y = part.sum(0) if splits > 1 else part[0]
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype)
