"""GEMM candidates: the ways one ``y = x @ w.T + b`` can be computed on this device.

A candidate is a name plus two functions: ``prepare(w, m)`` builds what it needs from the weight once
(a prepacked or re-laid copy, or nothing), ``run(x, state, b)`` computes the product for a 2-D ``x``.
``aten`` (``F.linear`` on the weight as the model holds it) is the default every other one must beat.
``copies_weight`` says whether the state is a second copy of the weight (memory is reported, not hidden).

CPU candidates (fp32/bf16): ``aten_relayout`` (the other weight layout, row-major vs K-major),
``mkl_packed`` (MKL's packed GEMM, one packed copy serving every M, ``ops/mkl_packed.py``; fp32 only), ``onednn`` (oneDNN
inner product on the plain weight), ``onednn_packed`` (oneDNN on a weight reordered to its blocked
format once), ``inductor_cpp`` (Inductor's C++ GEMM template, compiled per weight and M with the weight
frozen in; static M only), ``split_n`` (the weight's rows split into one block per thread, each
multiplied by single-threaded BLAS on its own worker), ``small_linear`` (zycompile's C++ kernel for
up to 16 rows, ``ops/csrc/small_linear.cpp``; more rows run the default) and ``panel_linear`` (its
kernel over a panel-packed copy of the weight, any M, ``ops/csrc/panel_linear.cpp``). GPU candidates (CUDA/ROCm): ``aten`` (cuBLAS/hipBLASLt through ``F.linear``) against a
sweep of Triton tile configs ``triton_<BM>x<BN>x<BK>_s<SPLIT_K>`` (``ops/triton_matmul.py``), split-K
ones for skinny decode GEMMs.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F

from zycompile.intraop import init_thread
from zycompile.ops import mkl_packed

DEFAULT = "aten"
ONEDNN_PACK_HINT = 16  # batch-size hint for oneDNN's reorder; one packed copy serves every M


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    prepare: Callable[[torch.Tensor, int], Any]  # (weight [N, K], M) -> state
    run: Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor]  # (x [M, K], state, bias)
    copies_weight: bool
    per_m: bool = False  # the state depends on M (one copy per M)
    exact_m: bool = False  # the state serves only its own M (a static-shape kernel); others use the default
    # runs on worker threads of its own: inside the symbolic-length prefill graph it lost to the runner-up
    own_threads: bool = False
    # timed only when asked for (``zycompile tune --include NAME``): slow to prepare and never a winner so far
    opt_in: bool = False
    available: Callable[[torch.device, torch.dtype], bool] = lambda device, dtype: True


def _relayout(w: torch.Tensor) -> torch.Tensor:
    """The same values in the other layout: K-major ([K, N] storage) <-> row-major."""
    return w.contiguous() if not w.is_contiguous() else w.t().contiguous().t()


def _onednn_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and dtype in (torch.float32, torch.bfloat16)
        and (dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def _mkl_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and mkl_packed.build() is None


class _Linear(torch.nn.Module):
    """One frozen linear for Inductor: the weight becomes a constant the C++ template packs."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        return (F.linear(x, self.w),)


# What ``aot_compile`` (the step cache's capture) switches on for the graph it saves; an inner compile
# must not inherit them (see _cpp_template_prepare).
_CAPTURE_AUTOGRAD_CACHE = (
    "bundled_autograd_cache",
    "strict_autograd_cache",
    "force_autograd_cache",
    "bypass_autograd_cache_key",
)


def _cpp_template_prepare(w: torch.Tensor, m: int):
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    # compile_fx directly, not torch.compile: Dynamo would key every weight on the one forward code
    # object and hit its recompile limit. Outside any outer tracing context (the pass builds states
    # while Dynamo compiles the model).
    gm = torch.fx.symbolic_trace(_Linear(w))
    x = torch.zeros(m, w.shape[1], dtype=w.dtype, device=w.device)
    patches = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}
    # Not under an enclosing capture's cache settings: when the step cache saves a graph (aot_compile),
    # AOTAutograd must bundle (strictly) every compile, and this frozen graph's compiled function is not
    # a bundleable OutputCode: the capture of every graph with an inductor_cpp GEMM failed.
    unbundled = {k: False for k in _CAPTURE_AUTOGRAD_CACHE if hasattr(functorch_config, k)}
    precompile = {k: False for k in ("caching_precompile",) if hasattr(dynamo_config, k)}
    with (
        torch._guards.tracing(None),
        inductor_config.patch(patches),
        functorch_config.patch(unbundled),
        dynamo_config.patch(precompile),
        torch.no_grad(),
    ):
        fn = compile_fx(gm, [x])
    return fn, w, m


def _cpp_template_run(x, state, b):
    fn, w, m = state
    if x.shape[0] != m:
        return F.linear(x, w, b)
    y = fn(x)[0]
    return y if b is None else y.add_(b)


_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _split_pool() -> tuple[int, ThreadPoolExecutor]:
    """One single-threaded worker per intra-op thread of this process (created once)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            n = torch.get_num_threads()
            pool = ThreadPoolExecutor(
                n, thread_name_prefix="zy-split-n", initializer=init_thread, initargs=(1,)
            )
            barrier = threading.Barrier(n)
            list(pool.map(lambda _: barrier.wait(), range(n)))  # start all n workers now
            torch.set_num_threads(n)  # set_num_threads(1) also lowered the default new threads read
            _POOL = (n, pool)
        return _POOL


def _split_n_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.get_num_threads() > 1


def _split_n_prepare(w: torch.Tensor, m: int):
    n, _ = _split_pool()
    bounds = [w.shape[0] * i // n for i in range(n + 1)]
    return [(lo, hi, w[lo:hi]) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def _mm_into(x, w, b, out):
    if b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)


def _split_n_run(x, blocks, b):
    _, pool = _split_pool()
    out = x.new_empty(x.shape[0], blocks[-1][1])
    futures = [
        pool.submit(_mm_into, x, w, None if b is None else b[lo:hi], out[:, lo:hi]) for lo, hi, w in blocks
    ]
    for f in futures:
        f.result()
    return out


def _cpu_kernel_ok(op: str) -> Callable[[torch.device, torch.dtype], bool]:
    """Availability of the C++ small-GEMM op ``op``: a CPU, a dtype it takes, an extension that builds."""

    def ok(device: torch.device, dtype: torch.dtype) -> bool:
        from zycompile.ops import cpu_kernels

        return (
            device.type == "cpu"
            and dtype in cpu_kernels.SMALL_GEMM_DTYPES[op]
            and cpu_kernels.build() is None
        )

    return ok


def _panel_linear_run(x, w, b):
    return torch.ops.zycompile_cpu.panel_linear.default(x, w, b)


def _small_linear_run(x, w, b):
    from zycompile.ops.cpu_kernels import SMALL_LINEAR_MAX_M

    if x.shape[0] > SMALL_LINEAR_MAX_M or w.stride() != (w.shape[1], 1):  # more rows, or a K-major weight
        return F.linear(x, w, b)
    return torch.ops.zycompile_cpu.small_linear.default(x, w, b)


CANDIDATES: dict[str, Candidate] = {
    c.name: c
    for c in [
        Candidate(DEFAULT, lambda w, m: w, lambda x, w, b: F.linear(x, w, b), copies_weight=False),
        Candidate(
            "aten_relayout",
            lambda w, m: _relayout(w),
            lambda x, w, b: F.linear(x, w, b),
            copies_weight=True,
            available=lambda device, dtype: device.type == "cpu",
        ),
        Candidate(
            "mkl_packed",
            lambda w, m: mkl_packed.pack(w),
            mkl_packed.linear,
            copies_weight=True,
            available=_mkl_ok,
        ),
        Candidate(
            "onednn",
            lambda w, m: w,
            lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
            copies_weight=False,
            available=_onednn_ok,
        ),
        Candidate(
            "onednn_packed",
            lambda w, m: torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), ONEDNN_PACK_HINT),
            lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
            copies_weight=True,
            available=_onednn_ok,
        ),
        Candidate(
            "inductor_cpp",
            _cpp_template_prepare,
            _cpp_template_run,
            copies_weight=True,
            per_m=True,
            exact_m=True,
            # Opt-in: on the Xeon it lost every one of 32 shapes (1.5-3.5x the winner's time); it compiles
            # a kernel per weight and M; and each prepare leaves ~20-26 MB resident (Inductor keeps the
            # frozen, packed weight; cache_clear does not free it), so a full tune reached 24 GB.
            opt_in=True,
            available=_onednn_ok,  # the template's weight packing and micro-kernels: oneDNN's ISA checks
        ),
        Candidate(
            "split_n",
            _split_n_prepare,
            _split_n_run,
            copies_weight=False,
            own_threads=True,
            available=_split_n_ok,
        ),
        Candidate(
            "small_linear",
            lambda w, m: w,
            _small_linear_run,
            copies_weight=False,
            available=_cpu_kernel_ok("small_linear"),
        ),
        # the op keeps its panel-packed copy itself (made on the first call with a weight)
        Candidate(
            "panel_linear",
            lambda w, m: w,
            _panel_linear_run,
            copies_weight=True,
            available=_cpu_kernel_ok("panel_linear"),
        ),
    ]
}


# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K): small-M tiles with split-K for decode, square tiles for prefill.
TRITON_CONFIGS = [
    (16, 64, 64, 1),
    (16, 128, 64, 1),
    (16, 64, 128, 4),
    (16, 128, 64, 8),
    (32, 64, 64, 2),
    (64, 64, 32, 1),
    (64, 128, 32, 1),
    (128, 128, 32, 1),
]


def _triton_ok(device: torch.device, dtype: torch.dtype) -> bool:
    from zycompile.ops import triton_matmul

    return device.type == "cuda" and triton_matmul.usable(device) and dtype.is_floating_point


def _triton_candidate(bm: int, bn: int, bk: int, split: int) -> Candidate:
    def run(x, w, b):
        from zycompile.ops.triton_matmul import linear

        return linear(x, w, b, bm, bn, bk, split)

    return Candidate(
        f"triton_{bm}x{bn}x{bk}_s{split}", lambda w, m: w, run, copies_weight=False, available=_triton_ok
    )


CANDIDATES.update({c.name: c for c in (_triton_candidate(*cfg) for cfg in TRITON_CONFIGS)})


def available(device: torch.device, dtype: torch.dtype) -> list[Candidate]:
    """The candidates this device and dtype can run, the default first."""
    out = []
    for c in CANDIDATES.values():
        try:
            ok = c.available(device, dtype)
        except (RuntimeError, AttributeError):  # an op missing from this build
            ok = False
        if ok:
            out.append(c)
    return out


def state_key(cand: Candidate, m: int) -> tuple[str, int]:
    return (cand.name, m if cand.per_m else 0)
