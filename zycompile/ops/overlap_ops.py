"""Custom ops the ``overlap_comm`` pass rewrites collective+GEMM pairs into.

``zycompile::all_gather_matmul(x, ws, biases, gather_dim, group_name, impl)`` returns
``[cat(all_gather(x), gather_dim) @ w (+ b) for w, b in zip(ws, biases)]``; one gather feeds every
weight (q/k/v share one). ``zycompile::matmul_reduce_scatter(x, w, scatter_dim, group_name, impl)``
returns this rank's ``scatter_dim`` block of the sum over ranks of ``x @ w``.

``impl`` is chosen by the pass when it rewrites the graph: ``ring`` runs the per-rank ring from
``ops/overlap.py`` (P2P, any backend: gloo on CPU); ``symm_mem`` calls PyTorch's symmetric-memory
fused ops (CUDA). Opaque to Inductor (a fallback kernel), so the decomposition is ours, not fused away.
"""

from __future__ import annotations

import torch
from torch.distributed.distributed_c10d import _resolve_process_group

from zycompile.ops import overlap

IMPLS = ("ring", "symm_mem")


def symm_mem_available() -> bool:
    ops = getattr(torch.ops, "symm_mem", None)
    return (
        torch.cuda.is_available()
        and ops is not None
        and hasattr(ops, "fused_all_gather_matmul")
        and hasattr(ops, "fused_matmul_reduce_scatter")
    )


def _world(group_name: str) -> int:
    return _resolve_process_group(group_name).size()


@torch.library.custom_op("zycompile::all_gather_matmul", mutates_args=())
def all_gather_matmul(
    x: torch.Tensor,
    ws: list[torch.Tensor],
    biases: list[torch.Tensor],
    gather_dim: int,
    group_name: str,
    impl: str,
) -> list[torch.Tensor]:
    if impl == "symm_mem":
        _, outs = torch.ops.symm_mem.fused_all_gather_matmul(x, ws, gather_dim, group_name, return_A=False)
        return [o + b for o, b in zip(outs, biases)] if biases else list(outs)
    group = _resolve_process_group(group_name)
    return overlap.all_gather_matmul(x, ws, group, gather_dim=gather_dim, biases=biases or None)


@all_gather_matmul.register_fake
def _(x, ws, biases, gather_dim, group_name, impl):
    shape = list(x.shape)
    shape[gather_dim] *= _world(group_name)
    return [x.new_empty((*shape[:-1], w.shape[1])) for w in ws]


@torch.library.custom_op("zycompile::matmul_reduce_scatter", mutates_args=())
def matmul_reduce_scatter(
    x: torch.Tensor, w: torch.Tensor, scatter_dim: int, group_name: str, impl: str
) -> torch.Tensor:
    if impl == "symm_mem":
        return torch.ops.symm_mem.fused_matmul_reduce_scatter(x, w, "sum", scatter_dim, group_name)
    return overlap.matmul_reduce_scatter(x, w, _resolve_process_group(group_name), scatter_dim=scatter_dim)


@matmul_reduce_scatter.register_fake
def _(x, w, scatter_dim, group_name, impl):
    shape = list(x.shape)
    shape[scatter_dim] //= _world(group_name)
    return x.new_empty((*shape[:-1], w.shape[1]))
