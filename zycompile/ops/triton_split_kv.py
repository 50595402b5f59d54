"""Triton split-KV (flash-decoding) attention for decode: one partial per (row, head, query, split), then a merge.

Stage 1 grid ``(B*Hq*Tq, num_splits)``: each program streams its block of keys with an online
softmax and writes ``o`` (normalised) and ``lse`` for its split. Stage 2 grid ``(B*Hq*Tq,)``: a
max / sum reduction over the splits (the tree merge; ``tl.max``/``tl.sum`` reduce in log depth).
GQA reads the shared KV head directly; Dv may differ from D (MLA). The mask is any bool mask
broadcastable to ``[B, Hq, Tq, Tk]`` (broadcast dims read with stride 0, never materialised).

GPU kernels; on CPU they run under Triton's interpreter (``TRITON_INTERPRET=1`` set before this
module is imported), which is how the tests check them against the torch reference.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the torch path
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_QUERY_TOKENS = 16  # beyond this (prefill) a tiled flash kernel wins; we fall back to torch


def supports(q, k, v, mask, causal) -> bool:
    """Whether the kernel handles this call (else the caller uses the torch path)."""
    return (
        triton is not None
        and (q.device.type == "cuda" or INTERPRET)
        and not causal
        and q.shape[-2] <= MAX_QUERY_TOKENS
        and (mask is None or mask.dtype == torch.bool)
    )


if triton is not None:

    @triton.jit
    def _partial_kernel(
        Q, K, V, MASK, OUT, LSE,
        sq_b, sq_h, sq_t,
        sk_b, sk_h, sk_t,
        sv_b, sv_h, sv_t,
        sm_b, sm_h, sm_t, sm_k,
        so_b, so_h, so_t, so_s,
        sl_b, sl_h, sl_t,
        Hq, Tq, Tk, rep, split_len, scale,
        HAS_MASK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        split = tl.program_id(1)
        t = pid % Tq
        h = (pid // Tq) % Hq
        b = pid // (Tq * Hq)
        kvh = h // rep
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = tl.load(Q + b * sq_b + h * sq_h + t * sq_t + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, Tk)
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for n0 in range(0, split_len, BLOCK_N):  # scalar bounds: the last split may be shorter
            offs_n = start + n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            kp = K + b * sk_b + kvh * sk_h + offs_n[:, None] * sk_t + offs_d[None, :]
            kt = tl.load(kp, mask=valid[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
            s = tl.sum(kt * q[None, :], axis=1) * scale
            if HAS_MASK:
                mp = MASK + b * sm_b + h * sm_h + t * sm_t + offs_n * sm_k
                valid = valid & (tl.load(mp, mask=valid, other=0) != 0)
            s = tl.where(valid, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe)
            vp = V + b * sv_b + kvh * sv_h + offs_n[:, None] * sv_t + offs_dv[None, :]
            vt = tl.load(vp, mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
            m_i = m_new
        m_fin = tl.where(m_i == -float("inf"), 0.0, m_i)
        lse = tl.where(l_i > 0, m_fin + tl.log(l_i), -float("inf"))
        out = acc / tl.maximum(l_i, 1e-30)
        tl.store(OUT + b * so_b + h * so_h + t * so_t + split * so_s + offs_dv, out, mask=offs_dv < DV)
        tl.store(LSE + b * sl_b + h * sl_h + t * sl_t + split, lse)

    @triton.jit
    def _merge_kernel(
        PO, PL, OUT, LSE,
        num_splits, Hq, Tq,
        DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)  # flat (b, h, t); partials are contiguous [B, Hq, Tq, S, (DV)]
        offs_s = tl.arange(0, BLOCK_S)
        offs_dv = tl.arange(0, BLOCK_DV)
        smask = offs_s < num_splits
        lse = tl.load(PL + pid * num_splits + offs_s, mask=smask, other=-float("inf"))
        m = tl.max(lse, axis=0)
        m = tl.where(m == -float("inf"), 0.0, m)
        w = tl.exp(lse - m)
        den = tl.sum(w, axis=0)
        op = PO + (pid * num_splits + offs_s[:, None]) * DV + offs_dv[None, :]
        o = tl.load(op, mask=smask[:, None] & (offs_dv[None, :] < DV), other=0.0)
        out = tl.sum(o * w[:, None], axis=0) / tl.maximum(den, 1e-30)
        tl.store(OUT + pid * DV + offs_dv, out.to(OUT.dtype.element_ty), mask=offs_dv < DV)
        tl.store(LSE + pid, m + tl.log(den))


def split_kv_attention(q, k, v, mask, scale: float, num_splits: int):
    """Launch both stages; returns ``(out [B,Hq,Tq,Dv] in q.dtype, lse [B,Hq,Tq] float32)``."""
    b, hq, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    splits = max(1, min(num_splits, tk))
    split_len = triton.cdiv(tk, splits)
    k, v = k.contiguous() if k.stride(-1) != 1 else k, v.contiguous() if v.stride(-1) != 1 else v
    q = q.contiguous() if q.stride(-1) != 1 else q
    part_o = torch.empty((b, hq, tq, splits, dv), dtype=torch.float32, device=q.device)
    part_l = torch.empty((b, hq, tq, splits), dtype=torch.float32, device=q.device)
    if mask is not None:
        mask = mask.expand(b, hq, tq, tk).view(torch.uint8)  # zero-copy: broadcast dims get stride 0
        m_arg, m_strides = mask, mask.stride()
    else:
        m_arg, m_strides = q, (0, 0, 0, 0)
    _partial_kernel[(b * hq * tq, splits)](
        q, k, v, m_arg, part_o, part_l,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *m_strides,
        *part_o.stride()[:4], *part_l.stride()[:3],
        hq, tq, tk, hq // hkv, split_len, scale,
        HAS_MASK=mask is not None, D=d, DV=dv,
        BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=triton.next_power_of_2(dv), BLOCK_N=64,
    )  # fmt: skip
    out = torch.empty((b, hq, tq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    _merge_kernel[(b * hq * tq,)](
        part_o, part_l, out, lse, splits, hq, tq,
        DV=dv, BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=triton.next_power_of_2(dv),
    )  # fmt: skip
    return out, lse
