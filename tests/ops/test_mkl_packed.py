"""zycompile_mkl (csrc/mkl_packed.cpp): one packed copy of a weight computes F.linear at every M,
including M far from the packing hint; a buffer of the wrong weight gets one clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zycompile.ops import mkl_packed

pytestmark = pytest.mark.skipif(mkl_packed.build() is not None, reason="MKL packed GEMM unavailable")


@pytest.mark.parametrize("n,k", [(576, 576), (3072, 576), (130, 72), (5, 1536)])
def test_one_packed_copy_serves_every_m(n, k):
    torch.manual_seed(n + k)
    w, b = torch.randn(n, k), torch.randn(n)
    state = mkl_packed.pack(w)
    for m in (1, 2, 7, 16, 100, mkl_packed.PACK_HINT, 300, 700):
        x = torch.randn(m, k)
        torch.testing.assert_close(mkl_packed.linear(x, state), F.linear(x, w), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(mkl_packed.linear(x, state, b), F.linear(x, w, b), rtol=1e-4, atol=1e-3)


def test_strided_input_empty_rows_and_a_foreign_buffer():
    w = torch.randn(64, 40)
    state = mkl_packed.pack(w)
    xt = torch.randn(40, 9).t()  # column-major: copied first
    torch.testing.assert_close(mkl_packed.linear(xt, state), F.linear(xt, w), rtol=1e-4, atol=1e-4)
    assert mkl_packed.linear(torch.randn(0, 40), state).shape == (0, 64)
    small = mkl_packed.pack(torch.randn(4, 40))  # MKL pads small buffers: a far bigger weight's is caught
    with pytest.raises(RuntimeError, match=r"not a \[3072, 576\] weight's"):
        mkl_packed.linear(torch.randn(3, 576), (small[0], 3072))
