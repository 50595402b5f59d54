"""MKL's packed SGEMM with one packed copy of a weight for every M (``csrc/mkl_packed.cpp``).

The ``mkl_packed`` tuning candidate. ATen's own ``mkl::_mkl_linear`` packs for one batch size and runs
unpacked for any other, so a symbolic-length prefill graph could not use packing, and a decode graph
kept one copy per M. Here a weight is packed once (with ``PACK_HINT`` as MKL's kernel hint) and serves
every M. That MKL computes any M from such a copy is checked once per process before first use: if it
ever stops holding (another MKL), ``build`` says why and the candidate is unavailable, never wrong.
Built as its own extension so that a torch without exported MKL symbols loses only this candidate.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("csrc") / "mkl_packed.cpp"
PACK_HINT = 256  # packed for M = 256, M = 3-512 ran as fast as a copy packed for exactly that M
_CHECK_M = (1, 3, 17, 100, 300)  # around and far from the hint


@functools.cache
def build() -> str | None:
    """Build or load the ops (``torch.ops.zycompile_mkl``) and check them; None if usable, else why not."""
    if not torch._C.has_mkl:
        return "this torch has no MKL"
    try:
        from torch.utils.cpp_extension import load

        load(
            name="zycompile_mkl_packed",
            sources=[str(SOURCE)],
            extra_cflags=["-O2"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, or MKL's symbols not exported by this libtorch
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 72, generator=gen), torch.randn(40, generator=gen)
    packed = (torch.ops.zycompile_mkl.pack.default(w, PACK_HINT), w.shape[0])
    for m in _CHECK_M:
        x = torch.randn(m, 72, generator=gen)
        if not torch.allclose(linear(x, packed, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4):
            return f"MKL's packed GEMM disagreed with F.linear at M={m} (packed with M={PACK_HINT})"
    return None


def pack(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The packed copy of fp32 ``w`` [N, K] and N. Keep the buffer where it is: MKL's layout depends on
    its address. Builds first (a graph loaded from the step cache runs this before any pass asked)."""
    why = build()
    if why is not None:
        raise RuntimeError(f"mkl_packed is unavailable here: {why}")
    return torch.ops.zycompile_mkl.pack.default(w, PACK_HINT), w.shape[0]


def linear(x: torch.Tensor, state: tuple[torch.Tensor, int], b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for x [M, K] from ``pack(w)``'s state, any M."""
    packed, n = state
    return torch.ops.zycompile_mkl.linear.default(x, packed, n, b)
