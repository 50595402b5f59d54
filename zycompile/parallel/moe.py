"""Expert parallelism for MoE layers (HF 5.x fused experts, Qwen3-MoE) under TP and TSP.

A MoE layer's router (``mlp.gate``, ``[E, H]``) picks the top-k of E experts per token; the experts
are two 3-D parameters, ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``. Sharded, each rank
holds E/D whole experts (``Shard(0)``: rank r owns experts ``r*E/D ..``) and the router replicated
(``E x H``, small), so every rank routes a token exactly as one process does.

``expert_partial`` gives, for the tokens it is handed, the contributions of one group of experts,
computing only the (token, expert) pairs routed to that group (a grouped GEMM over the pairs sorted
by expert); pairs routed elsewhere contribute exact zeros. A token's output is the sum of its k
routed experts' outputs, each computed once, on its owner: summing the groups' partials is the
single-process result up to the order of the additions.

- **TP** (tokens replicated): each rank adds up its own experts for all tokens, then one all-reduce
  per MoE layer (``ExpertParallel``: a ``Partial`` DTensor made ``Replicate``), the same count as a
  dense MLP's row-wise down_proj.
- **TSP prefill** (tokens sharded, 1/D per rank): the experts travel, as TSP's dense MLP weights do.
  Each rank's group goes once around the ring (D-1 point-to-point shifts) and every rank applies each
  visiting group to its own tokens, accumulating locally: every token meets each of its experts
  exactly once and nothing is all-reduced. The usual expert-parallel alternative, an all-to-all
  dispatch of tokens to their experts' owners, moves fewer bytes when tokens are few, but its split
  sizes depend on the routing: no static graph, and a capacity limit would drop tokens (inexact).
- **TSP decode** (one token per row, replicated): the experts stay, TP-style: partial + one all-reduce.
"""

from __future__ import annotations

import types

import torch
from torch.distributed.tensor.parallel.style import ParallelStyle

import zycompile.ops.grouped_mm  # noqa: F401  (registers zycompile::grouped_mm)


def is_moe(mlp: torch.nn.Module) -> bool:
    """A HF 5.x sparse MoE block: a router ``gate`` and fused 3-D ``experts``."""
    experts = getattr(mlp, "experts", None)
    w = getattr(experts, "gate_up_proj", None)
    return hasattr(mlp, "gate") and isinstance(w, torch.Tensor) and w.dim() == 3


def num_experts(config) -> int | None:
    """Routed experts of a MoE config (None for a dense model)."""
    return getattr(config, "num_experts", None) or getattr(config, "n_routed_experts", None) or None


def expert_partial(x, idx, weights, gate_up, down, first: int, act) -> torch.Tensor:
    """Sum over each token's routed experts among ``first .. first+G-1`` (``gate_up [G, 2I, H]``,
    ``down [G, H, I]``) of ``weight * down_e(act(gate_e x) * up_e x)``; ``x [N, H]``, ``idx``/``weights``
    ``[N, k]`` (the router's choices). Pairs routed to other experts give exact zeros."""
    g, k = gate_up.shape[0], idx.shape[1]
    local = idx - first
    mine = (local >= 0) & (local < g)
    ids = torch.where(mine, local, g).reshape(-1)  # pairs of other groups sort last, past offs[-1]
    order = torch.argsort(ids, stable=True)
    counts = ids.new_zeros(g + 1).scatter_add_(0, ids, torch.ones_like(ids))  # pairs per expert
    offs = counts[:g].cumsum(0)
    h = torch.ops.zycompile.grouped_mm(x[order // k], gate_up, offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch.ops.zycompile.grouped_mm(act(gate) * up, down, offs)
    y = y * torch.where(mine, weights, 0).reshape(-1)[order, None].to(y.dtype)
    out = torch.zeros_like(y).index_copy(0, order, y)  # back to (token, slot) order
    return out.view(-1, k, y.shape[-1]).sum(1).to(x.dtype)


class ExpertParallel(ParallelStyle):
    """TP style for a fused ``experts`` module: E/D whole experts per rank, one all-reduce of the
    partial sums (tokens and router replicated)."""

    def _apply(self, module: torch.nn.Module, device_mesh) -> torch.nn.Module:
        from torch.distributed.tensor import Shard, distribute_tensor

        for name in ("gate_up_proj", "down_proj"):
            w = distribute_tensor(
                getattr(module, name).detach(), device_mesh, [Shard(0)], src_data_rank=self.src_data_rank
            )
            module.register_parameter(name, torch.nn.Parameter(w, requires_grad=False))
        module._zy_mesh = device_mesh
        module._zy_first = module.gate_up_proj.to_local().shape[0] * device_mesh.get_local_rank()
        module.forward = types.MethodType(_expert_parallel_forward, module)  # replaces HF's dispatch
        return module


def _expert_parallel_forward(self, hidden_states, top_k_index, top_k_weights):
    from torch.distributed.tensor import DTensor, Partial, Replicate

    part = expert_partial(
        hidden_states,
        top_k_index,
        top_k_weights,
        self.gate_up_proj.to_local(),
        self.down_proj.to_local(),
        self._zy_first,
        self.act_fn,
    )
    summed = DTensor.from_local(part, self._zy_mesh, [Partial()], run_check=False)
    return summed.redistribute(placements=[Replicate()]).to_local()


# ---- TSP ----------------------------------------------------------------------------------------


def route(lay, x: torch.Tensor):
    """``x [B, T, H]`` -> flat tokens and the replicated router's (expert ids, weights), ``[B*T, k]``."""
    flat = x.reshape(-1, x.shape[-1])
    _, weights, idx = lay.router(flat)
    return flat, idx, weights


def prefill_moe(ring, lay, x: torch.Tensor) -> torch.Tensor:
    """MoE for this rank's tokens: the experts' shards go once around the ring (packed, one shift a step);
    at step s the visiting group is rank (r - s)'s."""
    flat, idx, weights = route(lay, x)
    gu, dn = lay.w_gate_up.to_local(), lay.w_experts_down.to_local()
    g = gu.shape[0]
    cur, acc = torch.cat([gu.reshape(-1), dn.reshape(-1)]), None
    for s in range(ring.world):
        nxt = ring.shift(cur) if s + 1 < ring.world else None  # next group moves while this one computes
        w_gu, w_dn = cur.split([gu.numel(), dn.numel()])
        first = ((ring.rank - s) % ring.world) * g
        y = expert_partial(flat, idx, weights, w_gu.view(gu.shape), w_dn.view(dn.shape), first, lay.act)
        acc = y if acc is None else acc + y
        cur = nxt
    return acc.view(x.shape)


def decode_moe(ring, lay, x: torch.Tensor) -> torch.Tensor:
    flat, idx, weights = route(lay, x)
    gu = lay.w_gate_up.to_local()
    part = expert_partial(
        flat, idx, weights, gu, lay.w_experts_down.to_local(), ring.rank * gu.shape[0], lay.act
    )
    return ring.all_reduce(part).view(x.shape)
