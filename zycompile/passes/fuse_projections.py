"""Fuse linear projections that read the same input into one GEMM (q/k/v, gate/up).

Before::

    linear = linear(x, q_weight, None);  linear_1 = linear(x, k_weight, None)
    linear_2 = linear(x, v_weight, None)

After::

    _zy_fused_0 = self._zy_fused_0                       # [Nq+Nk+Nv, K], holds the weights
    fused = linear(x, _zy_fused_0, None)
    split = torch.split(fused, [Nq, Nk, Nv], dim=-1)
    linear = split[0];  linear_1 = split[1];  linear_2 = split[2]

Memory: the model keeps one copy. Before tracing, ``prepare`` (a module transform run by
``zycompile.optimize``) finds the linears that read the same tensor in one probe forward and lays
their weights back to back in one buffer, the parameters becoming views of it
(``param.data = fused[a:b]``). The pass then only wraps that storage in a view; it never copies.
Weights not laid out so (plain ``torch.compile(backend="zycompile")``) are left alone, with a note.
Writes to the parameters (``load_state_dict``) reach the fused buffer too. Inference only.
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict

import torch
import torch.fx
import torch.nn.functional as F

from zycompile.passes import register_pass
from zycompile.passes.base import GraphPass, PassResult
from zycompile.passes.fx_util import LINEAR, fake_of, propagate_meta, real_tensors

log = logging.getLogger("zycompile")


@register_pass
class FuseProjectionsPass(GraphPass):
    name = "fuse_projections"
    stage = "pre_grad"
    relays_weights = True

    @staticmethod
    def prepare(model: torch.nn.Module, opts) -> None:
        prepare_model(model)

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        tensors = real_tensors(gm, self.ctx.example_inputs)
        groups: dict[torch.fx.Node, list[torch.fx.Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if (
                node.op == "call_function"
                and node.target in LINEAR
                and isinstance(node.args[0], torch.fx.Node)
            ):
                groups[node.args[0]].append(node)
        matches, notes = 0, []
        for linears in groups.values():
            if len(linears) < 2:
                continue
            weights = [tensors.get(_arg(n, 1, "weight")) for n in linears]
            biases = [_arg(n, 2, "bias") for n in linears]
            reason = _refusal(weights, biases, tensors)
            if reason:
                notes.append(f"{', '.join(n.name for n in linears)}: {reason}")
                continue
            bias_t = None if biases[0] is None else [tensors[b] for b in biases]
            if not _adjacent(weights) or (bias_t is not None and not _adjacent(bias_t)):
                notes.append(
                    f"{', '.join(n.name for n in linears)}: weights are not laid out back to back; "
                    "zycompile.optimize() does that before tracing (fusing here would copy them)"
                )
                continue
            fused_w = storage_view(weights)
            fused_b = None if bias_t is None else storage_view(bias_t)
            self._rewrite(gm, linears, fused_w, fused_b, [w.shape[0] for w in weights])
            matches += 1
        if matches:
            gm.graph.lint()
            gm.recompile()
        return PassResult(modified=matches > 0, matches=matches, notes=notes)

    def _rewrite(self, gm, linears, fused_w, fused_b, sizes) -> None:
        graph = gm.graph
        first = min(linears, key=_position(graph))
        x = first.args[0]
        with graph.inserting_before(first):
            w_node = _add_constant(gm, fused_w)
            b_node = None if fused_b is None else _add_constant(gm, fused_b)
            fused = graph.call_function(F.linear, (x, w_node, b_node))
            propagate_meta(fused)
            split = graph.call_function(torch.split, (fused, sizes), {"dim": -1})
            propagate_meta(split)
            parts = []
            for i in range(len(sizes)):
                part = graph.call_function(operator.getitem, (split, i))
                propagate_meta(part)
                parts.append(part)
        for old, new in zip(linears, parts):
            old.replace_all_uses_with(new)
            graph.erase_node(old)


def _arg(node, index, name):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _position(graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


def _refusal(weights, biases, tensors, grad_ok: bool = False) -> str | None:
    if any(w is None for w in weights):
        return "a weight is computed in the graph, not a parameter"
    if any(w.dim() != 2 for w in weights):
        return "weights are not 2-D"
    w0 = weights[0]
    if any((w.dtype, w.device, w.shape[1]) != (w0.dtype, w0.device, w0.shape[1]) for w in weights):
        return "weights differ in dtype, device or in_features"
    if any(w.is_quantized or type(w) not in (torch.Tensor, torch.nn.Parameter) for w in weights):
        return "weights are tensor subclasses (e.g. DTensor); shard before fusing"
    if any(b is not None for b in biases) and not all(b in tensors for b in biases):
        return "some projections have a bias and others not (or a computed bias)"
    if not grad_ok and torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return "autograd is recording; fused weights are for inference only"
    if len({id(w) for w in weights}) != len(weights):
        return "the same weight is used twice"
    return None


def _k_major(t: torch.Tensor) -> bool:
    """A 2-D weight stored transposed (``weight_layout``): stride (1, ld) with ld >= rows."""
    return t.dim() == 2 and t.stride(0) == 1 and t.shape[1] > 1 and t.stride(1) >= t.shape[0]


def storage_view(parts: list[torch.Tensor]) -> torch.Tensor:
    """The tensor spanning adjacent ``parts`` along dim 0, sharing their storage (either layout)."""
    first = parts[0]
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape, first.stride())


def fuse_storage(parts: list[torch.Tensor]) -> torch.Tensor:
    """Lay ``parts`` back to back (dim 0) in one new buffer; each becomes a view of it (one copy in memory).

    Row-major parts are stacked; K-major parts (``weight_layout``) are stacked as columns of one
    K-major buffer, so the fused weight keeps the layout the GEMV streams fastest.
    """
    if _adjacent(parts):
        return storage_view(parts)
    k_major = all(_k_major(p) for p in parts)
    with torch.no_grad():
        if k_major:
            fused = torch.cat([p.detach().t() for p in parts], dim=1).t()  # [N, K] view of a [K, N] buffer
        else:
            fused = torch.cat([p.detach() for p in parts], dim=0)
    offset = 0
    for p in parts:
        p.data = fused[offset : offset + p.shape[0]]
        offset += p.shape[0]
    return fused


def sibling_linears(model: torch.nn.Module, example: dict) -> list[list[torch.nn.Linear]]:
    """Groups of nn.Linear modules that read the same tensor, found by one probe forward."""
    seen: dict[int, tuple[torch.Tensor, list[torch.nn.Linear]]] = {}

    def hook(mod, inputs):
        x = inputs[0]
        # Keep x alive in `seen` so its id cannot be reused by another tensor during the probe.
        seen.setdefault(id(x), (x, []))[1].append(mod)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if type(m) is torch.nn.Linear]
    try:
        with torch.no_grad():
            model(**example)
    finally:
        for h in handles:
            h.remove()
    return [mods for _, mods in seen.values() if len(mods) > 1]


def prepare_model(model: torch.nn.Module) -> int:
    """Module transform before tracing: fuse the storage of sibling linears. Returns groups fused."""
    device = next(model.parameters()).device
    example = {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device), "use_cache": False}
    groups = 0
    try:
        siblings = sibling_linears(model, example)
    except Exception as e:  # not an HF-style causal LM forward: nothing is laid out, the pass will say so
        log.warning(
            "fuse_projections: probe forward failed (%s: %s); weights left as they are", type(e).__name__, e
        )
        return 0
    for mods in siblings:
        weights = [m.weight for m in mods]
        biases = [m.bias for m in mods]
        if _refusal(weights, biases, {b: b for b in biases if b is not None}, grad_ok=True):
            continue
        fuse_storage(weights)
        if biases[0] is not None:
            fuse_storage(biases)
        groups += 1
    return groups


def _adjacent(parts: list[torch.Tensor]) -> bool:
    """True when ``parts`` lie back to back along dim 0 in one storage (laid out by ``prepare``)."""
    ptr = parts[0].untyped_storage().data_ptr()
    offset = parts[0].storage_offset()
    if all(p.is_contiguous() for p in parts):
        step = lambda p: p.numel()  # noqa: E731
    elif all(_k_major(p) and p.stride() == parts[0].stride() for p in parts):
        if parts[0].stride(1) != sum(p.shape[0] for p in parts):
            return False
        step = lambda p: p.shape[0]  # noqa: E731
    else:
        return False
    for p in parts:
        if p.untyped_storage().data_ptr() != ptr or p.storage_offset() != offset:
            return False
        offset += step(p)
    return True


def _add_constant(gm: torch.fx.GraphModule, tensor: torch.Tensor) -> torch.fx.Node:
    name = f"_zy_fused_{sum(1 for n in gm.graph.nodes if n.op == 'get_attr' and 'fused' in str(n.target))}"
    while hasattr(gm, name):
        name += "_"
    # Persistent: the non-persistent name *set* pickles in hash-seed order and would make
    # AOTAutograd's cache key differ between processes.
    gm.register_buffer(name, tensor)
    if hasattr(gm, "_param_name_to_source"):
        # AOTAutograd maps each lifted Dynamo buffer to its source (for dedup guards); ours is a constant.
        from torch._dynamo.source import ConstantSource

        gm._param_name_to_source[name] = ConstantSource(name)
    node = gm.graph.get_attr(name)
    fake = fake_of(gm, tensor)
    if fake is not None:
        node.meta["example_value"] = fake
    return node
