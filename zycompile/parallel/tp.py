"""Plain tensor parallelism on DTensor: shard a HF decoder over the ranks with its plan from plans.py.

A module transform before tracing (as torchtitan does): ``parallelize_module`` turns the planned
weights into DTensor shards; modules keep returning plain local tensors, so attention runs on this
rank's heads and the graph Dynamo captures holds the collectives (functional all-reduce/all-gather).
Shapes that do not divide the degree are refused before anything is sharded.
"""

from __future__ import annotations

import torch

from zycompile.errors import ZyError
from zycompile.parallel.plans import TP_PLANS, plan_for, styles


class ShardingError(ZyError):
    """The model cannot be sharded as the recipe asks."""


def check_divisible(config, degree: int) -> None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    require_divisible(
        text.model_type,
        degree,
        [
            ("num_attention_heads", text.num_attention_heads),
            ("num_key_value_heads", kv),
            ("intermediate_size", text.intermediate_size),
        ],
    )


def require_divisible(model_type: str, degree: int, sizes: list[tuple[str, int]]) -> None:
    """One clear ShardingError for the first size ``degree`` ranks cannot split evenly."""
    for name, value in sizes:
        if value % degree:
            raise ShardingError(
                f"parallel.degree {degree}: {model_type} has {name}={value}, which {degree} ranks "
                f"cannot split evenly; use a degree dividing {value}"
            )


def apply_tp(model: torch.nn.Module, degree: int, device_type: str = "cpu", sequence_parallel: bool = False):
    """Shard ``model`` in place over a 1-D mesh of ``degree`` ranks; returns the mesh.

    ``sequence_parallel``: also shard the residual stream and norms on the sequence (tp_sequence.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    model_type = model.config.model_type
    if model_type not in TP_PLANS:
        raise ShardingError(
            f"parallel.mode 'tp': no plan for model_type '{model_type}' (planned: {', '.join(sorted(TP_PLANS))})"
        )
    check_divisible(model.config, degree)
    mesh = init_device_mesh(device_type, (degree,))
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    if tied:  # shard once (both are vocab-sharded on dim 0), then tie the shards again
        head.weight = torch.nn.Parameter(emb.weight.detach(), requires_grad=False)
    style = styles()
    plan = plan_for(model_type, sequence_parallel)
    parallelize_module(model, mesh, {fqn: style[name] for fqn, name in plan.items()})
    if tied:
        head.weight = emb.weight
    return mesh


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds for ``t`` (a DTensor's local shard, or a plain tensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()
