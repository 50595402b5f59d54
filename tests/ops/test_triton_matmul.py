"""Triton GEMM tuning candidates: numerics under Triton's interpreter (no GPU here), and listing."""

from __future__ import annotations

import textwrap

import torch

from zycompile.tuning import candidates as C

TRITON_CHECK = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from zycompile.ops import triton_matmul as T
    from zycompile.tuning.candidates import TRITON_CONFIGS
    cases = [  # m, n, k, bias, k_major
        (1, 96, 80, False, False), (3, 64, 200, True, False), (33, 70, 64, False, True), (8, 128, 300, True, False),
    ]
    checked = 0
    for i, (m, n, k, bias, k_major) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(m, k, generator=g)
        w = torch.randn(k, n, generator=g).t() if k_major else torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g) if bias else None
        want = F.linear(x, w, b)
        for cfg in [(16, 32, 32, 1), (16, 32, 32, 3), (32, 64, 16, 2)] + TRITON_CONFIGS[:2]:
            got = T.linear(x, w, b, *cfg)
            assert got.dtype == x.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
            checked += 1
    # half in, half out, fp32 accumulation (fp16: the interpreter's NumPy has no bfloat16)
    x, w = torch.randn(4, 64).half(), torch.randn(32, 64).half()
    got = T.linear(x, w, None, 16, 32, 32, 2)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=2e-2)
    print("triton matmul ok", checked)
    """
)


def test_triton_matmul_matches_linear_under_interpreter(run_interpreted):
    assert "triton matmul ok 20" in run_interpreted(TRITON_CHECK)


def test_gpu_candidates_are_the_triton_sweep(monkeypatch):
    # On CPU the sweep is not offered; on a CUDA/ROCm device it is, after aten (cuBLAS/hipBLASLt).
    assert not any(c.name.startswith("triton_") for c in C.available(torch.device("cpu"), torch.float32))
    from zycompile.ops import triton_matmul

    monkeypatch.setattr(triton_matmul, "usable", lambda device: True)
    names = [c.name for c in C.available(torch.device("cuda"), torch.bfloat16)]
    assert names[0] == C.DEFAULT
    assert names[1:] == [f"triton_{bm}x{bn}x{bk}_s{s}" for bm, bn, bk, s in C.TRITON_CONFIGS]
    assert any(s > 1 for *_, s in C.TRITON_CONFIGS)  # split-K for skinny decode GEMMs
