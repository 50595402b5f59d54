"""TSP: tensor + sequence parallelism (after Zyphra's TSP, arXiv 2604.26294) on one mesh axis of D ranks.

Each rank holds 1/D of every weight, as DTensor shards on a 1-D DeviceMesh: ``Shard(0)`` for q/k/v/
gate/up (output rows), ``Shard(1)`` for o/down (input columns), the embedding and LM head on the
vocabulary; norms are replicated. The math (``tsp_layers.py``) uses the shards' ``to_local()``.

- **Prefill** shards the *tokens*: a prompt of T tokens is padded to a multiple of 2D and split
  zigzag (rank r takes chunks r and 2D-1-r) so causal attention work is balanced. Norms and
  residuals are per token, so activations stay ``T/D x hidden`` per rank; the weight shards travel
  instead (q/k/v and o broadcast in turn, the MLP's around a point-to-point ring), and K/V of the
  chunk is all-gathered for attention and for the owners' cache writes. No all-reduce in the MLP.
  Attention needs no position mask: a zigzag chunk sees the earlier chunks whole and itself causally
  (flash calls merged by log-sum-exp), so what grows with T/D x T is only kernel work.
- **Decode** runs one token per row, fewer tokens than ranks, so sharding tokens has nothing to
  split: moving 1/D of every weight per generated token would cost ~(D-1)/D of the model's bytes
  per step, against a few KiB of activations. Decode therefore keeps the same shards stationary
  (TP-style: column shards + all-gather of q/k/v, row shards + all-reduce for o and down) and
  attends with tree attention over the sequence-sharded KV cache (``SeqShardedKVCache``).

Shards need not be head-aligned: every rank gathers whole heads before attention (prefill: all heads
of its tokens; decode: all heads of the new token), so only the projection row counts, the
intermediate size and the vocabulary must divide D. SmolLM2 (9 query / 3 KV heads of 64) therefore
runs at D = 2, 3 and 4, where plain TP needs whole heads per rank (D = 3 only).

MoE layers (Qwen3-MoE): each rank holds E/D whole experts and the router replicated; in prefill the
experts circulate around the ring like the dense MLP's shards, in decode they stay and one all-reduce
sums the ranks' partials (``moe.py``).

Limits: llama-family decoders only (llama, mistral, qwen2, qwen3, qwen3_moe); no sliding-window masks, no MLP
biases; prefill chunks after the first (prompts longer than the largest prefill bucket) all-gather
the cache slices (a full layer's KV cache, transiently); no speculative decoding or export.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from zycompile.parallel.moe import decode_moe, is_moe, num_experts, prefill_moe
from zycompile.parallel.tp import ShardingError, require_divisible
from zycompile.parallel.tsp_layers import (
    NEVER,
    Ring,
    decode_attention,
    decode_mlp,
    embed_partial,
    prefill_attention,
    prefill_embed,
    prefill_mlp,
    zigzag,
)

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
ATTENTION_PASSES = ("canonicalize_attention", "tree_attention")  # TSP issues its attention ops itself


def check_tsp(config, degree: int) -> None:
    """Refuse, before anything is sharded, a model TSP cannot split over ``degree`` ranks."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if text.model_type not in ARCHS:
        raise ShardingError(
            f"parallel.mode 'tsp': model_type '{text.model_type}' is not supported (supported: {', '.join(ARCHS)})"
        )
    if getattr(text, "mlp_bias", False):
        raise ShardingError(f"parallel.mode 'tsp': {text.model_type} with mlp_bias is not supported")
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    sizes = [
        ("num_attention_heads x head_dim", heads * head_dim),
        ("num_key_value_heads x head_dim", kv * head_dim),
        ("intermediate_size", text.intermediate_size),
        ("vocab_size", text.vocab_size),
    ]
    if num_experts(text):  # whole experts per rank
        sizes.append(("num_experts", num_experts(text)))
    require_divisible(text.model_type, degree, sizes)


def _local(t: torch.Tensor, dim: int, mesh) -> torch.Tensor:
    """This rank's ``1/D`` slice of ``t`` along ``dim`` (a view)."""
    return t.detach().chunk(mesh.size(), dim=dim)[mesh.get_local_rank()]


def _param(local: torch.Tensor, dim: int, mesh) -> nn.Parameter:
    """``local`` as this rank's ``Shard(dim)`` of a DTensor parameter (no copy: views stay views)."""
    from torch.distributed.tensor import DTensor, Shard

    return nn.Parameter(DTensor.from_local(local, mesh, [Shard(dim)], run_check=False), requires_grad=False)


def _shard(t: torch.Tensor, dim: int, mesh) -> nn.Parameter:
    """This rank's ``1/D`` slice of ``t`` along ``dim`` as a DTensor parameter (a copy: ``t`` can be freed)."""
    return _param(_local(t, dim, mesh).contiguous().clone(), dim, mesh)


class TSPLayer(nn.Module):
    def __init__(self, layer: nn.Module, mesh):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.head_dim, self.scale = attn.head_dim, float(attn.scaling)
        self.q_rows, self.kv_rows = attn.q_proj.out_features, attn.k_proj.out_features
        # Fused per shard: this rank's q/k/v rows lie back to back in one buffer (bias as a last
        # column), the parameters are views of it. Prefill broadcasts it as is and applies each
        # received shard as one GEMM; decode applies it as one GEMM: no per-step weight copies.
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.qkv_bias = attn.q_proj.bias is not None
        parts = [_local(p.weight, 0, mesh) for p in projs]
        if self.qkv_bias:
            parts = [torch.cat([w, _local(p.bias, 0, mesh)[:, None]], 1) for w, p in zip(parts, projs)]
        self.register_buffer("qkv", torch.cat(parts), persistent=False)
        parts = self.qkv.split([w.shape[0] for w in parts])
        self.wq, self.wk, self.wv = (_param(w[:, :-1] if self.qkv_bias else w, 0, mesh) for w in parts)
        self.bq, self.bk, self.bv = (
            (_param(w[:, -1], 0, mesh) for w in parts) if self.qkv_bias else (None, None, None)
        )
        self.wo = _shard(attn.o_proj.weight, 1, mesh)
        self.bo = attn.o_proj.bias  # replicated: added once, after the shards' sum
        self.moe = is_moe(mlp)
        if self.moe:  # E/D whole experts; the router (E x H) replicated
            self.router, self.act = mlp.gate, mlp.experts.act_fn
            self.w_gate_up = _shard(mlp.experts.gate_up_proj, 0, mesh)
            self.w_experts_down = _shard(mlp.experts.down_proj, 0, mesh)
            return
        self.act = mlp.act_fn
        # [gate_r, up_r, down_r^T] (each [I/D, H]) in one buffer, the parameters views of it: what a
        # prefill ring step moves, and gate/up applied as one GEMM (fused per shard)
        gate, up = _local(mlp.gate_proj.weight, 0, mesh), _local(mlp.up_proj.weight, 0, mesh)
        down = _local(mlp.down_proj.weight, 1, mesh)
        self.register_buffer("mlp_buf", torch.stack([gate, up, down.t()]), persistent=False)
        self.w_gate, self.w_up = _param(self.mlp_buf[0], 0, mesh), _param(self.mlp_buf[1], 0, mesh)
        self.w_down = _param(self.mlp_buf[2].t(), 1, mesh)

    def qkv_packed(self) -> torch.Tensor:
        """``[Wq_r; Wk_r; Wv_r]`` (bias as a last column): what one prefill broadcast moves."""
        return self.qkv

    def mlp_packed(self) -> torch.Tensor:
        """``[gate_r, up_r, down_r^T]`` (each ``[I/D, H]``): what one MLP ring step moves."""
        return self.mlp_buf


class TSPCausalLM(nn.Module):
    """A llama-family causal LM sharded for TSP; ``step`` is the runtime's step, ``forward`` gives all logits."""

    def __init__(self, hf: nn.Module, ring: Ring, tree_opts: tuple[str, int, str] = ("tree", 1, "allreduce")):
        super().__init__()
        from torch.distributed.device_mesh import init_device_mesh

        device = next(hf.parameters()).device
        mesh = init_device_mesh(device.type, (ring.world,))
        self.config, self.generation_config = hf.config, getattr(hf, "generation_config", None)
        self.ring, self.tree_opts = ring, tree_opts
        base = hf.get_decoder()
        emb, head = hf.get_input_embeddings().weight, hf.get_output_embeddings().weight
        self.embed = _shard(emb, 0, mesh)
        self.lm_head = self.embed if head is emb else _shard(head, 0, mesh)  # tied: one shard
        self.vocab_start = ring.rank * (emb.shape[0] // ring.world)
        self.norm, self.rotary_emb = base.norm, base.rotary_emb
        self.layers = nn.ModuleList(TSPLayer(layer, mesh) for layer in base.layers)

    # ---- prefill: tokens sharded --------------------------------------------------------------------

    def _prefill(self, ids: torch.Tensor, pos: torch.Tensor, cache, past: bool):
        """Hidden states of this rank's tokens ``[B, n, H]`` and their indices in the (padded) chunk."""
        ring = self.ring
        d, t = ring.world, ids.shape[1]
        pad = -(-t // (2 * d)) * (2 * d) - t
        ids_p = F.pad(ids, (0, pad))
        pos_p = F.pad(pos, (0, pad), value=NEVER)  # padding: never attended, never cached
        idx = [zigzag(t + pad, d, j, ids.device) for j in range(d)]
        mine = idx[ring.rank]
        x = prefill_embed(ring, self.embed.to_local(), self.vocab_start, ids_p, idx)
        kpos = pos_p[:, torch.cat(idx)]  # the gathered keys' order: rank 0's tokens, rank 1's, ...
        lpos = pos_p[:, mine]
        cos, sin = self.rotary_emb(x, lpos.masked_fill(lpos == NEVER, 0))
        prior = None  # earlier chunks in the cache: every slot's position, and each row's first position here
        if cache is not None and past:
            prior = (torch.cat([cache.positions_of(j, ids.device) for j in range(d)]), pos[:, 0])
        for i, lay in enumerate(self.layers):
            h = lay.input_layernorm(x)
            x = x + prefill_attention(ring, lay, h, cos, sin, kpos, cache, i, prior)
            h = lay.post_attention_layernorm(x)
            x = x + (prefill_moe(ring, lay, h) if lay.moe else prefill_mlp(ring, lay, h, lay.act))
        return x, mine, idx

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` (replicated) -> full logits ``[B, V]`` from the vocab-sharded head (one all-gather)."""
        local = F.linear(self.norm(h), self.lm_head.to_local())
        return self.ring.gather(local).permute(1, 0, 2).reshape(h.shape[0], -1)

    # ---- decode: weights stationary -----------------------------------------------------------------

    def _decode(self, ids: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        ring = self.ring
        x = ring.all_reduce(embed_partial(ids, self.embed.to_local(), self.vocab_start))
        cos, sin = self.rotary_emb(x, pos)
        for i, lay in enumerate(self.layers):
            x = x + decode_attention(
                ring, lay, lay.input_layernorm(x), cos, sin, pos, cache, i, self.tree_opts
            )
            h = lay.post_attention_layernorm(x)
            x = x + (decode_moe(ring, lay, h) if lay.moe else decode_mlp(ring, lay, h, lay.act))
        return x[:, -1]

    def step(self, ids: torch.Tensor, pos: torch.Tensor, last: torch.Tensor, cache, past: bool = False):
        """The runtime's step: logits ``[B, V]`` (float32) after token ``last[b]`` of each row."""
        if ids.shape[1] == 1 and cache is not None:
            h = self._decode(ids, pos, cache)
        else:
            x, mine, _ = self._prefill(ids, pos, cache, past)
            # [B, n]: 1 where this rank holds the row's last token
            pick = (mine[None, :] == last[:, None]).to(x.dtype)
            h = self.ring.all_reduce((x * pick[..., None]).sum(1))  # exactly one rank contributes each row
        # a copy, not a view of the gathered logits: eager callers get a plain, waited-on tensor
        return self._logits(h).to(torch.float32, copy=True)

    def forward(self, input_ids, past_key_values=None, attention_mask=None, position_ids=None, **kwargs):
        """Logits of every position (no cache): the reference path for tests and ``OptimizedModel(ids)``."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if past_key_values is not None or attention_mask is not None:
            raise ShardingError(
                "parallel.mode 'tsp': run cached generation through generate(), not forward()"
            )
        b, t = input_ids.shape
        pos = position_ids if position_ids is not None else torch.arange(t, device=input_ids.device)
        x, _, idx = self._prefill(input_ids, pos.expand(b, t), None, False)
        order = torch.cat(idx)
        everyone = self.ring.gather(x).permute(1, 0, 2, 3).flatten(1, 2)  # [B, Tp, H] in gathered order
        full = everyone[:, torch.argsort(order)][:, :t]
        local = F.linear(self.norm(full), self.lm_head.to_local())  # [B, T, V/D]
        logits = self.ring.gather(local).permute(1, 2, 0, 3).reshape(b, t, -1)
        return CausalLMOutputWithPast(logits=logits)


def tsp_passes(recipe):
    """The recipe without passes TSP replaces or cannot run (with a note each), and tree-attention options."""
    from zycompile.passes import get_pass_class

    kept, notes, tree = [], [], ("tree", 1, "allreduce")
    for spec in recipe.passes:
        if spec.name == "tree_attention":
            tree = (spec.options.impl, spec.options.num_splits, spec.options.merge)
        if spec.name in ATTENTION_PASSES:
            notes.append(
                f"pass '{spec.name}' skipped under parallel.mode 'tsp' (TSP issues its own attention ops)"
            )
        elif spec.name == "fuse_projections":
            notes.append(
                "pass 'fuse_projections' skipped under parallel.mode 'tsp' (TSP's layers keep q/k/v and "
                "gate/up packed per shard: one GEMM each already)"
            )
        elif get_pass_class(spec.name).relays_weights:
            notes.append(
                f"pass '{spec.name}' skipped under parallel.mode 'tsp' (it re-lays unsharded weights)"
            )
        else:
            kept.append(spec)
    for n in notes:
        logging.getLogger("zycompile").warning(n)
    return dataclasses.replace(recipe, passes=tuple(kept)), notes, tree


def apply_tsp(model: nn.Module, degree: int, tree_opts=("tree", 1, "allreduce")) -> TSPCausalLM:
    """Shard a HF llama-family model for TSP over the sequence group; the HF weights can be freed after."""
    from zycompile.parallel.distributed import sequence_group

    check_tsp(model.config, degree)
    group = sequence_group()
    ring = Ring(group.size(), group.rank(), group, group.group_name)
    tsp = TSPCausalLM(model, ring, tree_opts)
    tsp.eval()
    return tsp


def tsp_generator(optimized):
    """The static-cache runtime for a TSP model: its step is ``TSPCausalLM.step`` (tokens split in prefill)."""
    from zycompile.runtime.generate import Generator

    class TSPGenerator(Generator):
        # whether the prefill chunk being run has earlier chunks in the cache (a guard: 2 graphs)
        past = False

        def _step(self, input_ids, pos, last, rows=None, keys=None):  # keys: None (sharded cache)
            self.cache.set_step(pos, rows)
            return self.model.step(input_ids, pos, last, self.cache, self.past)

        def prefill_chunk(self, rows, lens, start, count, cache_rows=None):
            self.past = start > 0
            try:
                return super().prefill_chunk(rows, lens, start, count, cache_rows)
            finally:
                self.past = False

    return TSPGenerator(optimized)
