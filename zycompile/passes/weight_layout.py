"""Store linear weights K-major (transposed) so decode GEMVs stream them at memory speed.

A module transform run by ``zycompile.optimize`` before tracing (``prepare``): each ``nn.Linear``
weight ``[N, K]`` is re-laid as the transpose of a contiguous ``[K, N]`` buffer
(``w.data = w.t().contiguous().t()``) — same values, same shape, one copy. ``F.linear`` then calls
the BLAS GEMM with a non-transposed B, which on this CPU reads a [49152, 576] LM head at ~2x the
rate of the row-major layout at M=1 (``bench/gemv_layout.py`` measures it). Prefill GEMMs are not
slowed. Put it before ``fuse_projections``, which keeps the layout when it fuses.

The graph pass itself changes nothing; it counts the linears that read K-major weights so the
compile report says the layout reached the graph.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from zycompile.passes import register_pass
from zycompile.passes.base import GraphPass, PassResult, meta_val
from zycompile.passes.fuse_projections import LINEAR, _k_major


@register_pass
class WeightLayoutPass(GraphPass):
    name = "weight_layout"
    stage = "pre_grad"
    relays_weights = True

    @dataclasses.dataclass(frozen=True)
    class Options:
        min_out_features: int = 1  # leave smaller linears row-major

    @staticmethod
    def prepare(model: torch.nn.Module, opts) -> None:
        with torch.no_grad():
            for mod in model.modules():
                w = getattr(mod, "weight", None)
                if not isinstance(mod, torch.nn.Linear) or w is None or w.dim() != 2:
                    continue
                if (
                    w.shape[0] < opts.min_out_features
                    or not w.is_contiguous()
                    or type(w) is not torch.nn.Parameter
                ):
                    continue
                w.data = w.data.t().contiguous().t()

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        count = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in LINEAR:
                w = meta_val(node.args[1]) if len(node.args) > 1 else None
                if isinstance(w, torch.Tensor) and _k_major(w):
                    count += 1
        return PassResult(modified=False, matches=count)
