"""``zycompile::grouped_mm(x, w, offs)``: rows ``offs[g-1]:offs[g]`` of ``x`` times ``w[g]^T``, per group g.

For MoE experts (``parallel/moe.py``): ``x [S, K]`` holds (token, expert) pairs sorted by expert,
``w [G, N, K]`` the experts' fused weights in HF's layout, ``offs [G]`` the cumulative pair counts.
Rows after ``offs[-1]`` (pairs routed to another rank's experts) come out zero and cost no GEMM.
Opaque to Dynamo and Inductor (register_fake): the group sizes are data a static graph cannot hold,
and ``torch._grouped_mm``'s fake kernel accepts bf16 only. One ``F.linear`` per non-empty group, the
same GEMM one process runs per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("zycompile::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], w.shape[1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], w[g])
        start = end
    return out


@grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[1])
