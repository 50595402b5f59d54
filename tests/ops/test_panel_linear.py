"""zycompile_cpu::panel_linear (csrc/panel_linear.cpp): y = x @ w.T + b over a panel-packed copy of w
that the op makes and keeps itself. Against F.linear past 16 rows and on strided inputs; the copy
follows the weight (an in-place write, a freed weight, another weight at the same address); inference
tensors keep no copy; bad inputs get one clear error."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from zycompile.ops import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.build() is not None, reason="C++ kernels unavailable")


def op(*args):
    return torch.ops.zycompile_cpu.panel_linear.default(*args)


def cache_bytes() -> int:
    return torch.ops.zycompile_cpu.panel_cache_bytes.default()


def test_any_row_count():  # the row-count sweep against F.linear is in test_small_linear.py
    torch.manual_seed(3)
    for m in (9, 16, 17, 21, 40):  # up to 16 rows in one sweep, then full sweeps and a remainder
        x, w, b = torch.randn(m, 70), torch.randn(45, 70), torch.randn(45)
        torch.testing.assert_close(op(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_strided_inputs_and_big_n_split_over_threads():
    torch.manual_seed(0)
    x = torch.randn(6, 2 * 576)[:, 100:676]  # rows 1152 floats apart
    w = torch.randn(49152 // 8, 576)
    torch.testing.assert_close(op(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    wt = torch.randn(576, 300).t()  # a K-major weight packs the same
    torch.testing.assert_close(op(x, wt), F.linear(x, wt), rtol=1e-5, atol=1e-4)


def test_the_copy_follows_the_weight():
    torch.manual_seed(1)
    x = torch.randn(3, 48)
    w = torch.randn(100, 48)
    before = op(x, w)
    with torch.no_grad():
        w.mul_(2)  # in place: the version counter moves, the copy is packed again
    torch.testing.assert_close(op(x, w), 2 * before, rtol=1e-5, atol=1e-4)
    w.data = torch.randn(100, 48)  # another storage under the same tensor
    torch.testing.assert_close(op(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    held = cache_bytes()
    assert held >= 128 * 48 * 4  # 100 rows padded to whole panels
    del w
    gc.collect()
    other = torch.randn(100, 48)  # may reuse the freed memory: must not reuse the freed weight's copy
    torch.testing.assert_close(op(x, other), F.linear(x, other), rtol=1e-5, atol=1e-4)
    assert cache_bytes() <= held  # the freed weight's copy was dropped when the next one was made


def test_inference_tensors_keep_no_copy():
    x = torch.randn(2, 32)
    with torch.inference_mode():
        w = torch.randn(40, 32)
        before = cache_bytes()
        torch.testing.assert_close(op(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
        w.mul_(3)  # no version counter: a kept copy would now be stale
        torch.testing.assert_close(op(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert cache_bytes() == before


def test_empty_and_bad_inputs():
    w = torch.randn(8, 16)
    assert op(torch.randn(0, 16), w).shape == (0, 8)
    with pytest.raises(RuntimeError, match="fp32 only"):
        op(torch.randn(2, 16).half(), w.half())
    with pytest.raises(RuntimeError, match="bf16 x and w expected"):
        op(torch.randn(2, 16), w.bfloat16())
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and w \[N, K\] expected"):
        op(torch.randn(2, 15), w)
    with pytest.raises(RuntimeError, match=r"bias must be fp32 \[N\]"):
        op(torch.randn(2, 16), w, torch.randn(7))


def test_views_at_one_address_keep_a_copy_each():
    """A fused q/k/v weight and its q part start at the same address: each keeps its own copy."""
    torch.manual_seed(2)
    fused = torch.randn(96, 40)
    q = fused[:64]
    x = torch.randn(2, 40)
    op(x, fused), op(x, q)
    held = cache_bytes()
    assert held >= (96 + 64) * 40 * 4  # both copies
    for _ in range(3):  # no re-packing: the cache holds the same two copies
        torch.testing.assert_close(op(x, fused), F.linear(x, fused), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(op(x, q), F.linear(x, q), rtol=1e-5, atol=1e-4)
    assert cache_bytes() == held


def packs() -> int:
    return torch.ops.zycompile_cpu.panel_cache_packs.default()


def alias(t: torch.Tensor) -> torch.Tensor:
    """Another tensor over t's storage with a version counter of its own (as ``set_`` makes them)."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def test_aliases_share_one_copy_and_any_of_them_can_invalidate_it():
    """Graphs may each hold their own alias of a weight (fuse_projections' view, a saved graph's
    rebound parameter), each with its own version counter: alternating them must not re-pack, and an
    in-place write through any alias seen before still re-packs."""
    torch.manual_seed(4)
    x = torch.randn(3, 48)
    w = torch.randn(64, 48)
    a, b = alias(w), alias(w)
    with torch.no_grad():
        a.add_(0)  # the aliases' counters now differ (1 and 0), as they did between two graphs
    start = packs()
    for _ in range(3):
        torch.testing.assert_close(op(x, a), F.linear(x, w), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(op(x, b), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert packs() == start + 1
    with torch.no_grad():
        a.mul_(2)  # written through a; b is handed next, and its own counter did not move
    torch.testing.assert_close(op(x, b), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert packs() == start + 2
    with torch.no_grad():
        b.sub_(1)
    torch.testing.assert_close(op(x, a), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert packs() == start + 3


def test_half_copy_streams_fp16_weights_with_fp32_math():
    """panel_linear_f16 keeps an fp16 copy (half the bytes) and computes in fp32: for weights that are
    fp16 values already (a saved EAGLE head) its output is panel_linear's, bit for bit."""
    torch.manual_seed(5)
    x = torch.randn(5, 96)
    w = torch.randn(70, 96).half().float()  # fp16 values held in fp32
    b = torch.randn(70)
    before = cache_bytes()
    y = torch.ops.zycompile_cpu.panel_linear_f16.default(x, w, b)
    assert cache_bytes() - before in (
        96 * 96 * 2,
        80 * 96 * 2,
    )  # 70 rows padded to whole panels (32 or 16 wide), 2 bytes each
    assert torch.equal(y, op(x, w, b))
    w32 = torch.randn(70, 96)  # other fp32 weights: the product of their fp16 rounding
    ref = F.linear(x, w32.half().float(), b)
    torch.testing.assert_close(torch.ops.zycompile_cpu.panel_linear_f16.default(x, w32, b), ref)
    with pytest.raises(RuntimeError, match="panel_linear_f16: fp32 only"):
        torch.ops.zycompile_cpu.panel_linear_f16.default(x.half(), w32.half())


def test_bf16_weights_keep_a_bf16_copy_and_round_the_fp32_product_once():
    """A bf16 model's decode GEMMs: a bf16 panel copy (half fp32's bytes), fp32 accumulation, the result
    rounded to bf16 once, as BLAS rounds its bf16 GEMM."""
    torch.manual_seed(6)
    x, w, b = torch.randn(5, 96).bfloat16(), torch.randn(70, 96).bfloat16(), torch.randn(70).bfloat16()
    before = cache_bytes()
    y = op(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 70)
    assert cache_bytes() - before in (
        96 * 96 * 2,
        80 * 96 * 2,
    )  # 70 rows padded to whole panels (32 or 16 wide), 2 bytes each
    want = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(y.float(), want.bfloat16().float(), rtol=2**-7, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"bias must be bf16 \[N\]"):
        op(x, w, b.float())
    for m, k in [(8, 95), (13, 1), (3, 577)]:  # odd K: the last k-step of a pair-packed copy stands alone
        x, w = torch.randn(m, k).bfloat16(), torch.randn(40, k).bfloat16()
        want = F.linear(x.float(), w.float()).bfloat16().float()
        torch.testing.assert_close(op(x, w).float(), want, rtol=2**-7, atol=1e-5)


def test_a_compiler_without_avx512bf16_still_builds_the_other_kernels(monkeypatch):
    calls = []

    def load(name, sources, cflags, ldflags=()):
        calls.append(cflags)
        return "error: unrecognized command-line option '-mavx512bf16'" if "-mavx512bf16" in cflags else None

    monkeypatch.setattr(cpu_kernels, "load_extension", load)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    cpu_kernels.build.cache_clear()
    try:
        assert cpu_kernels.build() is None
        assert len(calls) == 2 and "-DZY_DPBF16" in calls[0] and "-DZY_DPBF16" not in calls[1]
    finally:
        cpu_kernels.build.cache_clear()
