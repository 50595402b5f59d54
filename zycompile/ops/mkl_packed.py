"""MKL's packed SGEMM with one packed copy of a weight for every M (``csrc/mkl_packed.cpp``).

The ``mkl_packed`` tuning candidate. ATen's ``mkl::_mkl_linear`` packs for one batch size and runs
unpacked for any other, so a symbolic-length prefill graph could not use packing. Here a weight is
packed once (``PACK_HINT`` is MKL's kernel hint) and serves every M. That MKL computes any M from
such a copy is observed, not documented, so ``build`` checks it once per process on SmolLM2-sized
weights before first use; if it ever fails (another MKL), the candidate is unavailable, never wrong.
Built as its own extension: a torch without MKL's exported symbols, or no compiler, loses only this
candidate, and a plan that still names it (a saved graph) computes ``F.linear`` instead.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from zycompile.ops import cpu_kernels

SOURCE = Path(__file__).with_name("csrc") / "mkl_packed.cpp"
PACK_HINT = 256  # packed for M = 256, M = 3-512 ran as fast as a copy packed for exactly that M
# (N, K, M's): the layer shapes of SmolLM2 and a ragged one, at M's near and far from the hint
_CHECKS = ((1536, 576, (1, 3, 100, 300)), (576, 1536, (2, 17, 700)), (40, 72, (1, 5, 257)))


@functools.cache
def build() -> str | None:
    """Build or load the ops (``torch.ops.zycompile_mkl``) and check them; None if usable, else why not."""
    if not torch._C.has_mkl:
        return "this torch has no MKL"
    why = cpu_kernels.load_extension("zycompile_mkl_packed", [SOURCE], ["-O2"])
    if why is not None:  # no compiler, or MKL's symbols not exported by this libtorch
        return why
    gen = torch.Generator().manual_seed(0)
    try:
        for n, k, ms in _CHECKS:
            w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
            state = (torch.ops.zycompile_mkl.pack.default(w, PACK_HINT), w)
            for m in ms:
                x = torch.randn(m, k, generator=gen)
                if not torch.allclose(linear(x, state, b), F.linear(x, w, b), rtol=1e-4, atol=1e-3):
                    return f"MKL's packed GEMM disagreed with F.linear at M={m} N={n} K={k}"
    except Exception as e:  # a call MKL or the op refused
        return str(e).strip().splitlines()[0]
    return None


def pack(w: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(packed copy or None, w) for fp32 ``w`` [N, K]. None when the ops are unavailable, said once:
    a graph loaded from the step cache calls this before any pass asked. Keep the buffer where it is:
    MKL's layout depends on its address."""
    why = build()
    if why is not None:
        _warn_once(why)
        return None, w
    return torch.ops.zycompile_mkl.pack.default(w, PACK_HINT), w


def linear(x: torch.Tensor, state: tuple, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for x [M, K] from ``pack(w)``'s state, any M."""
    packed, w = state
    if packed is None:
        return F.linear(x, w, b)
    return torch.ops.zycompile_mkl.linear.default(x, packed, w.shape[0], w.shape[1], b)


@functools.cache
def _warn_once(why: str) -> None:
    print(f"zycompile: mkl_packed unavailable ({why}); those GEMMs run F.linear", file=sys.stderr)
