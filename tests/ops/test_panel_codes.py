"""panel_linear's coded copies (csrc/panel_codes.h): fp32 weights whose values are GGUF block codes
(Q4_1: d * q + m, Q8_0: d * q, per 32 values along K) keep the codes, and the op's results are the
fp32 copy's, bit for bit. Any other weight keeps the fp32 copy."""

from __future__ import annotations

import pytest
import torch
from gguf_codes import q4_1, q8_0  # tests/ is on sys.path (its conftest)

from zycompile.ops import cpu_kernels

pytestmark = [
    pytest.mark.skipif(cpu_kernels.build() is not None, reason="C++ kernels unavailable"),
    pytest.mark.skipif(
        torch.backends.cpu.get_cpu_capability() != "AVX512", reason="the coded kernels are AVX-512 only"
    ),
]
ops = torch.ops.zycompile_cpu


def both(x, w, b=None):
    """(fp32 copy's result, result with codes allowed, whether the latter made a coded copy)."""
    before = ops.panel_codes(False)
    try:
        ref = ops.panel_linear(x, w, b)
        ops.panel_codes(True)
        coded = ops.panel_cache_coded()
        got = ops.panel_linear(x, w, b)
        return ref, got, ops.panel_cache_coded() > coded
    finally:
        ops.panel_codes(before)


@pytest.mark.parametrize("make", [q4_1, q8_0])
def test_block_codes_give_the_fp32_results_bit_for_bit(make):
    torch.manual_seed(0)
    w, b = make(77, 96), torch.randn(77)  # 77 columns: a padded last panel
    first = True
    for m in (1, 5, 8, 16, 17, 40):  # one sweep per panel up to 16 rows; past that, rebuilt once and swept
        ref, got, made = both(torch.randn(m, 96), w, b)
        assert torch.equal(got, ref)
        assert made == first  # one coded copy, reused
        first = False


def test_the_coded_copy_is_smaller():
    w = q4_1(256, 512)
    x = torch.randn(2, 512)
    before = ops.panel_cache_bytes()
    _, _, made = both(x, w)
    assert made
    fp32_and_codes = ops.panel_cache_bytes() - before
    # the fp32 copy (4 bytes a weight) and the 4-bit one (half a byte plus fp32 d and m per 32)
    assert fp32_and_codes == 256 * 512 * 4 + 256 * 512 // 32 * (16 + 4 + 4)


def test_other_weights_keep_the_fp32_copy():
    almost = q4_1(40, 64)
    almost[7, 33] = torch.nextafter(almost[7, 33], torch.tensor(1.0))  # one value off the codes
    for w in (torch.randn(40, 64), almost, q4_1(40, 64)[:, :48]):  # K = 48: not whole 32-value blocks
        ref, got, made = both(torch.randn(3, w.shape[1]), w)
        assert not made
        assert torch.equal(got, ref)


def test_a_write_to_a_coded_weight_is_followed():
    w = q4_1(64, 64)
    x = torch.randn(2, 64)
    before = ops.panel_codes(True)
    try:
        ops.panel_linear(x, w)
        coded = ops.panel_cache_coded()
        with torch.no_grad():
            w.mul_(2.0)  # still codes (d and m doubled exactly): coded again from the new values
        got = ops.panel_linear(x, w)
        assert ops.panel_cache_coded() == coded + 1
        ops.panel_codes(False)
        ref = ops.panel_linear(x, w)
        assert torch.equal(got, ref)
    finally:
        ops.panel_codes(before)


def test_the_switch_returns_the_previous_setting():
    before = ops.panel_codes(False)
    try:
        assert ops.panel_codes(True) is False
        assert ops.panel_codes(True) is True
    finally:
        ops.panel_codes(before)


@pytest.mark.slow
def test_the_embedded_smollm2_is_coded_whole():
    """SmolLM2's GGUF is Q4_1 (layers) and Q8_0 (the tied embedding / LM head): every decode GEMM
    weight keeps codes, and the products are the fp32 copy's."""
    from zycompile.models import load_model

    model = load_model("smollm2-135m-instruct").model
    torch.manual_seed(0)
    layer = model.model.layers[0]
    for w in (layer.self_attn.q_proj.weight, layer.mlp.down_proj.weight, model.lm_head.weight):
        ref, got, made = both(torch.randn(4, w.shape[1]), w.detach())
        assert made
        assert torch.equal(got, ref)


def test_mbu_counts_the_bytes_a_coded_weight_streams():
    from zycompile.runtime.metrics import weight_bytes_per_token

    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 64, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(q4_1(32, 64))
    coded = 32 * 64 // 32 * (16 + 4 + 4)  # one panel of 32 columns, two 32-value blocks
    assert cpu_kernels.coded_bytes(model[0].weight) == coded
    assert cpu_kernels.coded_bytes(model[1].weight) is None  # random values: the fp32 copy
    assert weight_bytes_per_token(model) == (32 * 64 + 64 * 32) * 4
    assert weight_bytes_per_token(model, cpu_kernels.coded_bytes) == coded + 64 * 32 * 4
