"""Turn small-M linears (decode steps, speculative verify) into weight-streaming kernels.

``kernel: auto`` (the default) calls zycompile's C++ kernel ``zycompile_cpu::panel_linear``
(``ops/csrc/panel_linear.cpp``) for fp32 and bf16 graphs where it builds: it packs each weight once into
k-major panels of output columns (a second copy of the weight, made on the first call) so every thread
reads one contiguous stream, and feeds each weight vector to all M rows. On the 2-vCPU Zen 4 EPYC it
runs SmolLM2's decode GEMMs at M = 1/4/8 in 22.5/21.1/19.8 ms against the row-major kernel's
25.3/28.3/31.6 (``python bench/small_linear.py``). ``kernel: rows`` keeps that row-major kernel
(``zycompile_cpu::small_linear``: no copy, reads w as the model holds it). Exported packages, other
dtypes, ``kernel: reduction`` and a failed build (said once in the notes) get the reductions below.

A decode step multiplies a few rows (M = batch x tokens, 1-8) by every weight: it is a pure weight
read. BLAS on this kind of CPU streams an M=1 GEMV at ~10-19 GB/s and gets slower per weight byte
for M = 2..8; Inductor's fused reduction streams it at ~20-30 GB/s. Written as one reduction per row
over the same weight, Inductor fuses the M reductions into one loop that loads each weight vector
once for all rows, so a few rows cost about what one does, and each result row stays contiguous (a
single [N, M] reduction leaves a transposed layout that ruins the next GEMV's loop order).

The reductions, before::

    linear = linear(x, w, b)                         # x [B, T, K] with B*T = M <= max_m, w [N, K]

After::

    x2 = reshape(x, [M, K])
    r0 = sum(mul(w, x2[0]), -1) ... r{M-1} = sum(mul(w, x2[M-1]), -1)   # [N] each, fused
    out = stack([r0, ..., r{M-1}]).reshape(B, T, N) + b

Only graphs with a static M are rewritten (symbolic-length prefill keeps its GEMM). The panel kernel
packs any weight layout; the row-major kernel and the reductions need row-major ``[N, K]`` weights (the
layout HF loads): a K-major weight (``weight_layout``) would be read across rows, so with them such
linears are left alone with a note. Summation order differs from BLAS, so
results match to float rounding, not bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx

from zycompile.ops import cpu_kernels, half_linear
from zycompile.passes import register_pass
from zycompile.passes.base import GraphPass, PassResult, arg, meta_val
from zycompile.passes.fuse_projections import LINEAR
from zycompile.passes.fx_util import propagate_meta, real_tensors

KERNELS = ("auto", "rows", "reduction")
MAX_KERNEL_M = cpu_kernels.SMALL_LINEAR_MAX_M


@register_pass
class SmallGemmPass(GraphPass):
    name = "small_gemm"
    stage = "pre_grad"
    expect_matches = False  # a prefill-only graph has no small-M linear

    @dataclasses.dataclass(frozen=True)
    class Options:
        max_m: int = 8  # largest rows x tokens rewritten (measured on this CPU: M=8 ties BLAS)
        device: str = "cpu"  # only graphs on this device type (GPU GEMV kernels are already fine)
        kernel: str = "auto"  # "auto": the C++ panel kernel (fp32, bf16) where it builds; "rows": the
        # row-major C++ kernel (fp32, no weight copy); "reduction": Inductor's

        def check(self):
            if self.kernel not in KERNELS:
                yield "kernel", f"got {self.kernel!r}; allowed: {', '.join(KERNELS)}"
            if not 1 <= self.max_m <= MAX_KERNEL_M:
                yield "max_m", f"got {self.max_m!r}; expected 1..{MAX_KERNEL_M}"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        matches, notes, copies = 0, [], 0
        real = real_tensors(gm, self.ctx.example_inputs)  # owners' fp16-copy marks are on the real weights
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in LINEAR:
                continue
            x, w = meta_val(node.args[0]), meta_val(arg(node, 1, "weight"))
            if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or w.dim() != 2:
                continue
            if x.device.type != self.opts.device or not all(isinstance(d, int) for d in x.shape):
                continue
            m = math.prod(x.shape[:-1])
            if m > self.opts.max_m or m == 0:
                continue
            kernel = self._kernel(w, notes)
            if kernel != "panel_linear" and w.stride() != (w.shape[1], 1):  # the panel copy takes any layout
                notes.append(f"{node.name}: weight is not row-major [N, K] (K-major layout?); kept as GEMM")
                continue
            real_w = real.get(arg(node, 1, "weight"))
            if (
                kernel == "panel_linear"
                and real_w is not None
                and half_linear.wants_half(real_w)
                and cpu_kernels.coded_bytes(real_w) is None  # codes: fewer bytes than fp16, and exact
            ):
                kernel = "panel_linear_f16"  # a draft head's weights: half the bytes, fp32 math
            self._rewrite(gm, node, m, kernel)
            copies += _panel_bytes(w, kernel)
            matches += 1
        if copies:
            notes.append(
                f"panel-packed weight copies: {copies / 1e6:.1f} MB (made on the first call; one per "
                "weight, shared with tuned_gemm's; fp32 weights that are GGUF block codes keep codes, a fifth "
                "to a third of that)"
            )
        if matches:
            gm.graph.lint()
            gm.recompile()
        return PassResult(modified=matches > 0, matches=matches, notes=notes)

    def _kernel(self, w: torch.Tensor, notes: list[str]) -> str | None:
        """The ``zycompile_cpu`` op to call, or None for Inductor's reductions."""
        op = cpu_kernels.SMALL_GEMM_KERNEL_OPS.get(self.opts.kernel)
        if (
            op is None
            or self.ctx.exporting  # a package must not need our extension where it is loaded
            or w.dtype not in cpu_kernels.SMALL_GEMM_DTYPES[op]
            or w.device.type != "cpu"
        ):
            return None
        why = cpu_kernels.build()
        if why is not None:
            if not any(n.startswith("C++ small-GEMM kernels") for n in notes):
                notes.append(f"C++ small-GEMM kernels unavailable ({why}); using Inductor reductions")
            return None
        return op

    @staticmethod
    def _rewrite(gm: torch.fx.GraphModule, node: torch.fx.Node, m: int, kernel: str | None) -> None:
        g = gm.graph
        x, w, b = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
        lead = tuple(meta_val(x).shape[:-1])
        k, n = meta_val(w).shape[1], meta_val(w).shape[0]
        with g.inserting_before(node):
            x2 = _call(g, torch.reshape, (x, (m, k)))
            if kernel is not None:
                out = _call(g, getattr(torch.ops.zycompile_cpu, kernel).default, (x2, w, b))
            else:
                rows = []
                for i in range(m):  # one reduction per row; Inductor fuses them and loads w once
                    xi = _call(g, operator.getitem, (x2, i))
                    rows.append(_call(g, torch.sum, (_call(g, torch.mul, (w, xi)), -1)))
                out = _call(g, torch.stack, (rows, 0)) if m > 1 else _call(g, torch.unsqueeze, (rows[0], 0))
                if b is not None:
                    out = _call(g, torch.add, (out, b))
            out = _call(g, torch.reshape, (out, (*lead, n)))
        node.replace_all_uses_with(out)
        g.erase_node(node)


def _panel_bytes(w: torch.Tensor, kernel: str | None) -> int:
    """The copy ``kernel`` keeps of ``w`` (0 for the kernels that keep none): rows padded to whole
    panels (at most 32 columns each), in the weight's dtype or, for ``panel_linear_f16``, fp16."""
    per = {"panel_linear": w.element_size(), "panel_linear_f16": 2}.get(kernel, 0)
    return -(-w.shape[0] // 32) * 32 * w.shape[1] * per


def _call(g: torch.fx.Graph, target, args) -> torch.fx.Node:
    node = g.call_function(target, args)
    propagate_meta(node)
    return node
