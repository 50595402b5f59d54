"""Rewrite ``zycompile::attention`` into split-KV / tree / ring attention (run after canonicalize_attention).

Before::

    out = torch.ops.zycompile.attention.default(q, k, v, mask, 0.125, False)

After, ``group: none`` (one device, split-KV over ``num_splits`` blocks)::

    res = torch.ops.zycompile.split_kv_attention.default(q, k, v, mask, 0.125, False, 4)
    out = res[0]

After, ``group: sequence`` (KV cache sharded over the ranks; ``impl: tree`` or ``ring``)::

    res = torch.ops.zycompile.tree_attention.default(q, k, v, mask, 0.125, '0', 1, 'allreduce')
    out = res[0]

Invariants: exact attention (the partials' merge is exact, not an approximation). With a sharded
cache every attention must be rewritten — one left alone would attend to this rank's slice only —
so in ``sequence`` mode an unrewritable attention (bottom-right ``causal`` without an explicit
mask, or SDPA that canonicalize_attention refused) is an error, not a fallback.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Literal

import torch
import torch.fx

import zycompile.ops.tree_attention  # noqa: F401  (registers the ops)
from zycompile.errors import ZyError
from zycompile.passes import register_pass
from zycompile.passes.base import GraphPass, PassResult, is_call
from zycompile.passes.fx_util import SDPA, propagate_meta

ATTENTION = torch.ops.zycompile.attention.default
SPLIT_KV = torch.ops.zycompile.split_kv_attention.default
TREE = torch.ops.zycompile.tree_attention.default
RING = torch.ops.zycompile.ring_attention.default


@dataclasses.dataclass(frozen=True)
class TreeAttentionOptions:
    group: Literal["none", "sequence"] = "none"  # sequence: the recipe's parallel group shards the KV
    num_splits: int = 1  # KV blocks per device, merged by the same max/sum tree (flash-decoding)
    impl: Literal["tree", "ring"] = "tree"  # ring: the baseline, for comparison
    # tree's cross-rank merge: 2 all-reduces (bytes independent of the ranks) or 1 all-gather
    merge: Literal["allreduce", "allgather"] = "allreduce"

    def check(self):
        if self.num_splits < 1:
            yield "num_splits", f"got {self.num_splits!r}; expected an integer >= 1"
        if self.impl == "ring" and self.group == "none":
            yield "impl", "'ring' passes KV blocks between ranks; it needs group: sequence"


@register_pass
class TreeAttentionPass(GraphPass):
    name = "tree_attention"
    stage = "pre_grad"
    Options = TreeAttentionOptions

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        sharded = self.opts.group == "sequence"
        group_name = None
        if sharded:
            from zycompile.parallel.distributed import sequence_group

            group_name = sequence_group().group_name
        matches, notes = 0, []
        for node in list(gm.graph.nodes):
            if sharded and is_call(node, *SDPA):
                raise ZyError(
                    f"tree_attention: {node.name} is an attention canonicalize_attention could not rewrite; "
                    "with a sequence-sharded KV cache it would see only this rank's keys. Run "
                    "canonicalize_attention first and check its notes in compile_report()"
                )
            if not is_call(node, ATTENTION):
                continue
            q, k, v, mask, scale, causal = node.args
            if sharded and causal:
                raise ZyError(
                    f"tree_attention: {node.name} uses bottom-right causal masking without a mask; a sharded "
                    "cache needs the runtime's explicit position mask (run the model through its generator)"
                )
            if not sharded:
                target, args = SPLIT_KV, (q, k, v, mask, scale, causal, self.opts.num_splits)
            elif self.opts.impl == "tree":
                target, args = TREE, (q, k, v, mask, scale, group_name, self.opts.num_splits, self.opts.merge)
            else:
                target, args = RING, (q, k, v, mask, scale, group_name)
            with gm.graph.inserting_before(node):
                res = gm.graph.call_function(target, args)
                propagate_meta(res)
                out = gm.graph.call_function(operator.getitem, (res, 0))
                propagate_meta(out)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            matches += 1
        if matches:
            gm.graph.lint()
            gm.recompile()
        return PassResult(modified=matches > 0, matches=matches, notes=notes)
