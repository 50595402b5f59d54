"""zycompile_cpu::small_linear (csrc/small_linear.cpp): y = x @ w.T + b for up to 16 rows, against
F.linear, over the tile and vector tails and strided inputs; bad inputs get one clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zycompile.ops import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.build() is not None, reason="C++ kernels unavailable")


def op(*args):
    return torch.ops.zycompile_cpu.small_linear.default(*args)


@pytest.mark.parametrize("kernel", ["small_linear", "panel_linear"])  # (panel_linear: test_panel_linear.py)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16])
@pytest.mark.parametrize("n,k", [(576, 576), (130, 64), (7, 40), (1, 577), (4, 16), (33, 16)])
def test_matches_linear(kernel, m, n, k):
    torch.manual_seed(m * 1000 + n + k)
    fn = getattr(torch.ops.zycompile_cpu, kernel).default
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    torch.testing.assert_close(fn(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fn(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_strided_rows_and_big_n_split_over_threads():
    torch.manual_seed(0)
    big = torch.randn(6, 2 * 576)
    x = big[:, 100:676]  # rows 1152 floats apart
    w = torch.randn(49152 // 8, 576)
    torch.testing.assert_close(op(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    xt = torch.randn(576, 3).t()  # column-strided: copied first
    torch.testing.assert_close(op(xt, w), F.linear(xt, w), rtol=1e-5, atol=1e-4)


def test_empty_and_bad_inputs():
    w = torch.randn(8, 16)
    assert op(torch.randn(0, 16), w).shape == (0, 8)
    with pytest.raises(RuntimeError, match="at most 16 rows, got 17"):
        op(torch.randn(17, 16), w)
    with pytest.raises(RuntimeError, match="fp32 only"):
        op(torch.randn(2, 16).bfloat16(), w.bfloat16())
    with pytest.raises(RuntimeError, match=r"w must be row-major \[N, K\]"):
        op(torch.randn(2, 16), torch.randn(16, 8).t())
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and w \[N, K\] expected"):
        op(torch.randn(2, 15), w)
