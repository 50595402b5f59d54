"""Plain tensor parallelism on DTensor: shard a HF decoder over the ranks with its plan from plans.py.

A module transform before tracing (as torchtitan does): ``parallelize_module`` turns the planned
weights into DTensor shards; modules keep returning plain local tensors, so attention runs on this
rank's heads and the graph Dynamo captures holds the collectives (functional all-reduce/all-gather).
Shapes that do not divide the degree are refused before anything is sharded.

With ``local_columns`` (the recipe runs ``fuse_projections``) the column-wise projections are plain
local shards instead of DTensors (``LocalColwise``): their input is replicated and their output is
used on this rank, so the DTensor wrapping is a no-op around ``F.linear(x, W_r)``, and plain tensors
let the pass lay this rank's q/k/v (gate/up) shards back to back and run one local GEMM: shard
first, then fuse per shard.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch.distributed.tensor.parallel.style import ParallelStyle

from zycompile.errors import ZyError
from zycompile.parallel.plans import TP_PLANS, plan_for, styles


class ShardingError(ZyError):
    """The model cannot be sharded as the recipe asks."""


def check_divisible(config, degree: int) -> None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    from zycompile.parallel.moe import num_experts

    kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    sizes = [
        ("num_attention_heads", text.num_attention_heads),
        ("num_key_value_heads", kv),
        ("intermediate_size", text.intermediate_size),
    ]
    if num_experts(text):  # whole experts per rank
        sizes.append(("num_experts", num_experts(text)))
    require_divisible(text.model_type, degree, sizes)


def require_divisible(model_type: str, degree: int, sizes: list[tuple[str, int]]) -> None:
    """One clear ShardingError for the first size ``degree`` ranks cannot split evenly."""
    for name, value in sizes:
        if value % degree:
            raise ShardingError(
                f"parallel.degree {degree}: {model_type} has {name}={value}, which {degree} ranks "
                f"cannot split evenly; use a degree dividing {value}"
            )


def resolve_plan(model: torch.nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """The plan's patterns expanded to the module FQNs they match, in plan order; a pattern matching
    nothing (a MoE model's dense-MLP entries when every layer is sparse) is dropped."""
    names = [name for name, _ in model.named_modules()]
    return {name: style for pattern, style in plan.items() for name in names if fnmatchcase(name, pattern)}


def apply_tp(
    model: torch.nn.Module,
    degree: int,
    device_type: str = "cpu",
    sequence_parallel: bool = False,
    local_columns: bool = False,
):
    """Shard ``model`` in place over a 1-D mesh of ``degree`` ranks; returns the mesh.

    ``sequence_parallel``: also shard the residual stream and norms on the sequence (tp_sequence.py).
    ``local_columns``: column-wise projections as plain local shards, for ``fuse_projections``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    model_type = model.config.model_type
    if model_type not in TP_PLANS:
        raise ShardingError(
            f"parallel.mode 'tp': no plan for model_type '{model_type}' (planned: {', '.join(sorted(TP_PLANS))})"
        )
    check_divisible(model.config, degree)
    from zycompile.parallel.moe import num_experts

    if sequence_parallel and num_experts(model.config):
        raise ShardingError(
            f"parallel.sequence_parallel: not supported for MoE model_type '{model_type}' (its experts "
            "all-reduce over all tokens); set parallel.sequence_parallel: false"
        )
    mesh = init_device_mesh(device_type, (degree,))
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    if tied:  # shard once (both are vocab-sharded on dim 0), then tie the shards again
        head.weight = torch.nn.Parameter(emb.weight.detach(), requires_grad=False)
    style = styles()
    plan = resolve_plan(model, plan_for(model_type, sequence_parallel))
    if local_columns:
        plan = {fqn: "colwise_local" if name == "colwise" else name for fqn, name in plan.items()}
    parallelize_module(model, mesh, {fqn: style[name] for fqn, name in plan.items()})
    if tied:
        head.weight = emb.weight
    return mesh


class LocalColwise(ParallelStyle):
    """Column-wise ``nn.Linear`` as a plain local shard (rows ``r*N/D ..``, no hooks, no DTensor): for a
    replicated input whose output stays on this rank, exactly what ``ColwiseParallel`` computes."""

    def _apply(self, module: torch.nn.Module, device_mesh) -> torch.nn.Module:
        from torch.distributed.tensor import Shard, distribute_tensor

        for name in ("weight", "bias"):
            p = getattr(module, name, None)
            if p is not None:
                local = distribute_tensor(
                    p.detach(), device_mesh, [Shard(0)], src_data_rank=self.src_data_rank
                ).to_local()
                module.register_parameter(name, torch.nn.Parameter(local, requires_grad=False))
        module.out_features = module.weight.shape[0]
        return module


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds for ``t`` (a DTensor's local shard, or a plain tensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()
