"""Graph surgery helpers: op spellings (torch-level and ATen), fake-tensor metadata for new nodes, cleanup."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves, tree_map

from zycompile.passes.base import meta_val

aten = torch.ops.aten

# Each op as Dynamo records it (the torch-level call) and as torch.export records it (the ATen
# overload): the same pass runs on the live backend's graphs and on an exported program's graph
# (zycompile/export/passes.py), so a pass matches on these tuples, never on one spelling.
LINEAR = (F.linear, torch._C._nn.linear, aten.linear.default)
SDPA = (
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    aten.scaled_dot_product_attention.default,
)
RESHAPE = (torch.reshape, aten.reshape.default, aten.view.default)  # plus the methods reshape / view
EXPAND = (aten.expand.default,)  # plus the method expand
UNSQUEEZE = (torch.unsqueeze, aten.unsqueeze.default)  # plus the method unsqueeze
REPEAT_INTERLEAVE = (torch.repeat_interleave, aten.repeat_interleave.self_int)


def _fake_mode(vals):
    # The mode the recorded values live in (Dynamo hands backends a fresh TracingContext mode, so
    # detect_fake_mode() would pick the wrong one).
    leaves = (leaf for v in vals for leaf in tree_leaves(v))  # a split's value is a tuple of tensors
    return next((v.fake_mode for v in leaves if isinstance(v, FakeTensor)), None)


def _meta_key(node: torch.fx.Node) -> str:
    for inp in node.all_input_nodes:
        if "val" in inp.meta:
            return "val"
    return "example_value"


def propagate_meta(node: torch.fx.Node) -> None:
    """Run ``node`` on the fake tensors of its inputs and record the result, as Dynamo/AOT would."""
    fake_mode = _fake_mode(meta_val(n) for n in node.all_input_nodes)
    if fake_mode is None:
        return
    args, kwargs = tree_map(
        lambda a: meta_val(a) if isinstance(a, torch.fx.Node) else a, (node.args, node.kwargs)
    )
    with fake_mode:
        if node.op == "call_function":
            out = node.target(*args, **kwargs)
        elif node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            return
    node.meta[_meta_key(node)] = out


def fake_of(gm: torch.fx.GraphModule, tensor: torch.Tensor) -> torch.Tensor | None:
    """A fake tensor for a real one, in the graph's fake mode (for get_attr nodes we add)."""
    fake_mode = _fake_mode(meta_val(n) for n in gm.graph.nodes if n.op == "placeholder")
    return None if fake_mode is None else fake_mode.from_tensor(tensor, static_shapes=True)


def erase_if_dead(nodes: Iterable[torch.fx.Node]) -> None:
    """Erase the given nodes, and inputs that become unused, when nothing reads them and they are pure."""
    work = [n for n in nodes if isinstance(n, torch.fx.Node)]
    while work:
        node = work.pop()
        # impure_random=False: ATen SDPA / dropout are tagged random (their dropout draws); one a pass
        # replaced is dead, and keeping it would still run it.
        if (
            node.op not in ("call_function", "call_method")
            or node.users
            or node.is_impure(impure_random=False)
        ):
            continue
        if getattr(node, "_erased", False):
            continue
        inputs = node.all_input_nodes
        node.graph.erase_node(node)
        work.extend(inputs)


def real_tensors(gm: torch.fx.GraphModule, example_inputs) -> dict[torch.fx.Node, torch.Tensor]:
    """Map the graph's weight-carrying nodes (placeholders, get_attr) to the real tensors behind them."""
    out = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs or []):
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            out[node] = value
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                out[node] = value
    return out


def fetch_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj
