"""The C++ decode/verify attention kernel against plain math attention, and its fallback to SDPA."""

from __future__ import annotations

import pytest
import torch

from zycompile.ops import cpu_decode_attention, cpu_kernels
from zycompile.ops.attention import attention, reference_attention

kernel = cpu_decode_attention.load()
needs_kernel = pytest.mark.skipif(kernel is None, reason="no C++ toolchain: attention uses SDPA")


def _qkv(seed, b, hkv, rep, tq, tk, d, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * rep, tq, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g)
    v = torch.randn(b, hkv, tk, dv or d, generator=g)
    return q, k, v


def _prefix(lens, tq, tk):
    """A static cache's decode/verify mask: row of length n, query i sees keys < n - tq + 1 + i."""
    pos = torch.tensor(lens)[:, None] - tq + torch.arange(tq)
    return (torch.arange(tk)[None, None, :] <= pos[:, :, None])[:, None]


def _check(q, k, v, mask, scale=0.3, causal=False):
    out = kernel(q, k, v, mask, scale, causal)
    ref = reference_attention(q, k, v, mask, scale, causal)
    seen = ref.isfinite().all(-1)  # a query that may see no key: the kernel gives zeros
    torch.testing.assert_close(out[seen], ref[seen], rtol=1e-5, atol=1e-5)
    assert out[~seen].eq(0).all()


@needs_kernel
@pytest.mark.parametrize("d", [64, 128, 40])  # the two register-blocked head dims and the generic loop
@pytest.mark.parametrize("rep", [1, 3])
def test_decode_rows_of_different_lengths_over_several_key_blocks(d, rep):
    # a 300-slot cache: rows end inside the first, second and third 128-key block, one row is empty
    q, k, v = _qkv(1, 4, 2, rep, 1, 300, d)
    _check(q, k, v, _prefix([299, 5, 130, 0], 1, 300))


@needs_kernel
def test_verify_block_padding_broadcasts_and_head_dims():
    q, k, v = _qkv(2, 2, 3, 3, 5, 200, 64, dv=32)
    _check(q, k, v, _prefix([150, 40], 5, 200))  # verify triangle, value dim != key dim
    padded = _prefix([60, 60], 5, 200)
    padded[1, ..., :7] = False  # a left-padded row
    _check(q, k, v, padded)
    _check(q, k, v, _prefix([60], 5, 200).expand(2, 9, 5, 200).clone())  # per-head mask
    _check(q, k, v, _prefix([60], 5, 200)[0, 0])  # [Tq, Tk], broadcast over batch and heads
    _check(q, k, v, torch.rand(2, 9, 5, 200, generator=torch.Generator().manual_seed(0)) > 0.7)  # scattered


@needs_kernel
def test_a_mask_shared_by_the_heads_with_empty_rows():
    """A mixed step's prompt chunk: queries broadcast over the batch, one row's mask visible (a chunk
    triangle), the others empty; the mask is scanned once per row for all heads."""
    q, k, v = _qkv(5, 4, 3, 3, 6, 300, 64)
    mask = torch.zeros(4, 1, 6, 300, dtype=torch.bool)
    mask[2] = _prefix([140], 6, 300)[0]
    _check(q[:1].expand(4, -1, -1, -1), k, v, mask)


@needs_kernel
def test_causal_flag_is_bottom_right_aligned_with_or_without_mask():
    q, k, v = _qkv(3, 2, 1, 4, 6, 50, 64)
    _check(q, k, v, None, causal=True)
    _check(q, k, v, None)
    _check(q, k, v, torch.rand(2, 1, 6, 50, generator=torch.Generator().manual_seed(1)) > 0.5, causal=True)


@needs_kernel
def test_strided_cache_views():
    # the keys of a bigger cache, sliced and head-transposed: only the last dim needs to be contiguous
    q, k, v = _qkv(4, 2, 2, 2, 1, 256, 64)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :100]
    vt = v.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :100]
    _check(q, kt, vt, _prefix([100, 33], 1, 100))
    _check(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, _prefix([256, 9], 1, 256))


def test_attention_op_routes_short_fp32_and_bf16_blocks_to_the_kernel_and_others_to_sdpa():
    q, k, v = _qkv(5, 2, 3, 3, 4, 64, 64)
    mask = _prefix([50, 64], 4, 64)
    assert cpu_decode_attention.applies(q, k, v, mask)
    assert not cpu_decode_attention.applies(q, k, v, mask.float())  # additive mask: SDPA
    assert cpu_decode_attention.applies(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert not cpu_decode_attention.applies(q.half(), k.half(), v.half(), mask)
    assert not cpu_decode_attention.applies(q, k.bfloat16(), v.bfloat16(), mask)  # mixed: SDPA
    long_q = torch.randn(2, 9, cpu_decode_attention.MAX_QUERIES + 1, 64)
    assert not cpu_decode_attention.applies(long_q, k, v, None)  # a prefill chunk: SDPA's flash kernel
    out = attention(q, k, v, mask, 0.125, False)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, 0.125), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("d", [64, 128, 40])  # the register-blocked head dims, and the generic path
def test_bf16_keys_and_values_are_widened_and_the_math_is_fp32(d):
    """A bf16 model's cache: the kernel's output is fp32 attention over the bf16 values, rounded once
    to bf16 (SDPA's bf16 result is within that rounding too)."""
    q, k, v = (t.bfloat16() for t in _qkv(8, 3, 2, 3, 2, 300, d))
    mask = _prefix([300, 141, 7], 2, 300)
    out = kernel(q, k, v, mask, d**-0.5, False)
    assert out.dtype == torch.bfloat16
    want = reference_attention(q.float(), k.float(), v.float(), mask, d**-0.5)
    torch.testing.assert_close(out.float(), want.bfloat16().float(), rtol=0, atol=2**-7)
    with pytest.raises(RuntimeError, match="all fp32 or all bf16"):
        kernel(q.float(), k, v, mask, 0.1, False)


def test_unbuildable_kernel_falls_back_to_sdpa_and_says_so_once(monkeypatch, capsys):
    import torch.utils.cpp_extension as ext

    def no_compiler(*a, **kw):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(ext, "load", no_compiler)
    cpu_decode_attention.load.cache_clear()
    cpu_kernels.build.cache_clear()
    try:
        q, k, v = _qkv(6, 1, 3, 3, 1, 80, 64)
        mask = _prefix([70], 1, 80)
        for _ in range(2):
            out = attention(q, k, v, mask, 0.125, False)
            torch.testing.assert_close(out, reference_attention(q, k, v, mask, 0.125), rtol=1e-5, atol=1e-5)
        err = capsys.readouterr().err
        assert err.count("CPU decode-attention kernel unavailable (Ninja is required") == 1
        assert "using SDPA" in err
    finally:
        monkeypatch.undo()
        cpu_kernels.build.cache_clear()  # the next caller loads the built kernels again
        cpu_decode_attention.load.cache_clear()


def test_position_mask_is_causal_per_row_and_computed_once_per_graph():
    from torch._inductor.utils import run_and_get_code

    from zycompile.ops.attention import position_mask

    keys, pos = torch.arange(8), torch.tensor([[2, 3], [5, 6]])
    m = position_mask(keys, pos)
    assert m.shape == (2, 1, 2, 8) and torch.equal(m, keys[None, None, None, :] <= pos[:, None, :, None])

    def layers(q, k, v, keys, pos):  # four attention layers sharing one mask, like a decoder
        mask = position_mask(keys, pos)
        for _ in range(4):
            q = attention(q, k, v, mask, 0.5, False)
        return q

    q, k, v = torch.randn(2, 2, 2, 4), torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4)
    torch._dynamo.reset()
    out, (code, *_) = run_and_get_code(torch.compile(layers, backend="inductor"), q, k, v, keys, pos)
    torch.testing.assert_close(out, layers(q, k, v, keys, pos))
    # one mask buffer for every layer: an inline compare would be recomputed into each layer's kernel
    assert code.count("zycompile.position_mask.default(") == 1 and "torch.bool" not in code
