"""Tensor-parallel plans as data: per architecture, module FQN pattern -> sharding style name.

Megatron-style: attention q/k/v column-wise (each rank owns whole heads), o row-wise (one
all-reduce); MLP gate/up column-wise, down row-wise (one all-reduce); embeddings and LM head sharded
on the vocabulary; MoE experts split whole across the ranks (expert parallel, see moe.py), their
router replicated. Styles are names here so plans stay data; ``styles()`` turns them into
``torch.distributed.tensor.parallel`` objects. A pattern may match nothing in a given model (a MoE
model's dense MLP entries when every layer is sparse): ``tp.resolve_plan`` keeps what matches.
"""

from __future__ import annotations

from typing import Any

_DENSE_DECODER = {
    "model.embed_tokens": "vocab_embedding",
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "lm_head": "vocab_head",
}

# Qwen3-MoE: attention as dense; sparse layers' experts expert-parallel (dense layers keep the MLP rows)
_MOE_DECODER = {**_DENSE_DECODER, "model.layers.*.mlp.experts": "experts"}

# Sequence parallelism (``parallel.sequence_parallel``) on top of the dense plan: the residual stream
# and the norms are sharded on the sequence; the attention / MLP input is all-gathered once for
# q/k/v (gate/up), and o/down reduce-scatter onto the sequence (see tp_sequence.py).
_SEQUENCE_PARALLEL = {
    "model.embed_tokens": "seq_vocab_embedding",
    "model.layers.*.input_layernorm": "seq_norm",
    "model.layers.*.self_attn": "gather_seq_hidden_states",
    "model.layers.*.self_attn.o_proj": "seq_rowwise",
    "model.layers.*.post_attention_layernorm": "seq_norm",
    "model.layers.*.mlp": "gather_seq",
    "model.layers.*.mlp.down_proj": "seq_rowwise",
    "model.norm": "seq_norm_gather",
}


def plan_for(model_type: str, sequence_parallel: bool = False) -> dict[str, str]:
    plan = dict(TP_PLANS[model_type])
    if sequence_parallel:
        plan.update(_SEQUENCE_PARALLEL)
    return plan


# model_type (HF config) -> plan. Qwen3's per-head q/k norms need nothing: each rank has whole heads.
TP_PLANS: dict[str, dict[str, str]] = {
    "llama": _DENSE_DECODER,
    "mistral": _DENSE_DECODER,
    "qwen2": _DENSE_DECODER,
    "qwen3": _DENSE_DECODER,
    "qwen3_moe": _MOE_DECODER,
}


def styles() -> dict[str, Any]:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from zycompile.parallel.moe import ExpertParallel
    from zycompile.parallel.tp import LocalColwise
    from zycompile.parallel.tp_sequence import GatherSequence, SeqNorm, SeqRowwise

    return {
        "colwise": ColwiseParallel(),
        "colwise_local": LocalColwise(),  # plain local shard, for fuse_projections (tp.py)
        "rowwise": RowwiseParallel(),
        "vocab_embedding": RowwiseParallel(input_layouts=Replicate()),  # rows = vocabulary entries
        "vocab_head": ColwiseParallel(output_layouts=Replicate()),  # every rank gets full logits
        "seq_vocab_embedding": SeqRowwise(embedding=True),
        "seq_rowwise": SeqRowwise(),
        "seq_norm": SeqNorm(),
        "seq_norm_gather": SeqNorm(gather=True),
        "gather_seq": GatherSequence(),
        "gather_seq_hidden_states": GatherSequence(kwarg="hidden_states"),
        "experts": ExpertParallel(),
    }
