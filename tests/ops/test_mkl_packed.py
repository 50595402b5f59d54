"""zycompile_mkl (csrc/mkl_packed.cpp): one packed copy of a weight computes F.linear at every M,
including M far from the packing hint; an input of the wrong width or a buffer too small for the
weight gets one clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zycompile.ops import mkl_packed

needs_build = pytest.mark.skipif(mkl_packed.build() is not None, reason=f"mkl_packed: {mkl_packed.build()}")


@needs_build
@pytest.mark.parametrize("n,k", [(576, 576), (3072, 576), (130, 72), (5, 1536)])
def test_one_packed_copy_serves_every_m(n, k):
    torch.manual_seed(n + k)
    w, b = torch.randn(n, k), torch.randn(n)
    state = mkl_packed.pack(w)
    for m in (1, 2, 7, 16, 100, mkl_packed.PACK_HINT, 300, 700):
        x = torch.randn(m, k)
        torch.testing.assert_close(mkl_packed.linear(x, state), F.linear(x, w), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(mkl_packed.linear(x, state, b), F.linear(x, w, b), rtol=1e-4, atol=1e-3)


@needs_build
def test_strided_input_empty_rows_and_a_foreign_buffer():
    w = torch.randn(64, 40)
    state = mkl_packed.pack(w)
    xt = torch.randn(40, 9).t()  # column-major: copied first
    torch.testing.assert_close(mkl_packed.linear(xt, state), F.linear(xt, w), rtol=1e-4, atol=1e-4)
    assert mkl_packed.linear(torch.randn(0, 40), state).shape == (0, 64)
    with pytest.raises(RuntimeError, match=r"fp32 x \[M, 40\] expected"):
        mkl_packed.linear(torch.randn(3, 41), state)
    small = mkl_packed.pack(torch.randn(4, 40))  # MKL pads small buffers: a far bigger weight's is caught
    with pytest.raises(RuntimeError, match=r"not a \[3072, 576\] weight's"):
        mkl_packed.linear(torch.randn(3, 576), (small[0], torch.empty(3072, 576)))


def test_unavailable_ops_compute_f_linear(monkeypatch, capsys):
    """A saved graph naming mkl_packed, on a machine that cannot build it: F.linear, said once."""
    monkeypatch.setattr(mkl_packed, "build", lambda: "no compiler")
    w, x = torch.randn(8, 16), torch.randn(3, 16)
    state = mkl_packed.pack(w)
    assert state[0] is None
    torch.testing.assert_close(mkl_packed.linear(x, state), F.linear(x, w))
    assert "mkl_packed unavailable (no compiler)" in capsys.readouterr().err
