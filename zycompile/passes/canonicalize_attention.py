"""Rewrite the attention forms HF models produce into one ``zycompile::attention`` op.

Before (SDPA, possibly after repeat_kv)::

    getitem = keys[(slice(None), slice(None), None, slice(None), slice(None))]
    expand = getitem.expand(1, 2, 2, 8, 16);  k_rep = expand.reshape(1, 4, 8, 16)
    out = scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask, dropout_p=0.0, scale=0.25)

Before (eager)::

    s = matmul(q, k_rep.transpose(2, 3)) * 0.25;  s = s + mask
    p = softmax(s, dim=-1, dtype=torch.float32).to(torch.float32);  p = dropout(p, p=0.0, training=False)
    out = matmul(p, v_rep)

After (both)::

    out = torch.ops.zycompile.attention.default(q, keys, values, mask, 0.25, False)

The same forms as torch.export records them (``aten.scaled_dot_product_attention``, repeat_kv as
``aten.unsqueeze → aten.expand → aten.reshape``) are matched too; the eager form is matched only as
Dynamo records it (an exported eager-attention model keeps its math, and the pass says it matched nothing).

Invariants: repeat_kv copies are dropped (the op does GQA itself); nothing is rewritten unless the
result is the same math: dropout must be a no-op, softmax over the last dim, intermediates read by
nothing else, ``is_causal`` only where Tq == Tk is proven by the recorded shapes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F

import zycompile.ops  # noqa: F401  (registers zycompile::attention)
from zycompile.passes import register_pass
from zycompile.passes.base import GraphPass, PassResult, arg, is_call, is_method, meta_val, only_user
from zycompile.passes.fx_util import (
    EXPAND,
    REPEAT_INTERLEAVE,
    RESHAPE,
    SDPA,
    UNSQUEEZE,
    erase_if_dead,
    propagate_meta,
)

MATMUL = (torch.matmul, operator.matmul)
SOFTMAX = (F.softmax, torch.softmax)
ATTENTION_OP = torch.ops.zycompile.attention.default


@register_pass
class CanonicalizeAttentionPass(GraphPass):
    name = "canonicalize_attention"
    stage = "pre_grad"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        matches, notes = 0, []
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph:  # erased by an earlier rewrite
                continue
            if is_call(node, *SDPA):
                found = self._match_sdpa(node, notes)
            elif is_call(node, *MATMUL) or is_method(node, "matmul"):
                found = self._match_eager(node, notes)
            else:
                continue
            if found is None:
                continue
            q, k, v, mask, scale, causal, dead = found
            if any(getattr(meta_val(n), "requires_grad", False) for n in (q, k, v, mask)):
                # zycompile::attention has no autograd formula: AOT would fail tracing the backward.
                notes.append(f"{node.name}: autograd is recording; zycompile::attention is inference only")
                continue
            # Only k/v are un-repeated (the op broadcasts kv heads, never q heads), and only when both
            # come back with the same head count.
            k_src, v_src = _unrepeat(k), _unrepeat(v)
            if meta_val(k_src).shape[1] != meta_val(v_src).shape[1]:
                k_src, v_src = k, v
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(ATTENTION_OP, (q, k_src, v_src, mask, float(scale), causal))
            propagate_meta(new)
            node.replace_all_uses_with(new)
            erase_if_dead([node, *dead, k, v])
            matches += 1
        if matches:
            gm.graph.lint()
            gm.recompile()
        # A graph that calls the op already (a mixed step's split attention) is in canonical form: its
        # calls count as matched, so the pass does not report a graph it has nothing left to do in.
        canonical = sum(is_call(n, ATTENTION_OP) for n in gm.graph.nodes) - matches
        if canonical and not matches:
            notes.append(f"{canonical} zycompile::attention call(s) already in the graph")
        return PassResult(modified=matches > 0, matches=matches + canonical, notes=notes)

    # --- SDPA ------------------------------------------------------------------------------

    def _match_sdpa(self, node: torch.fx.Node, notes: list[str]):
        q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
        mask = arg(node, 3, "attn_mask")
        dropout = arg(node, 4, "dropout_p", 0.0)
        causal = arg(node, 5, "is_causal", False)
        scale = arg(node, 6, "scale")
        qv, kv = meta_val(q), meta_val(k)
        if dropout != 0.0:
            notes.append(f"{node.name}: dropout_p={dropout} is not a no-op; left as SDPA")
            return None
        if not isinstance(causal, bool) or not _is_4d(q, k, v):
            notes.append(f"{node.name}: needs 4-D q/k/v and a constant is_causal; left as SDPA")
            return None
        if causal and (mask is not None or qv.shape[-2] != kv.shape[-2]):
            notes.append(
                f"{node.name}: is_causal with a mask or Tq != Tk (upper-left alignment); left as SDPA"
            )
            return None
        if scale is None:
            scale = qv.shape[-1] ** -0.5
        if not isinstance(scale, (int, float)):
            return None
        return q, k, v, mask, scale, causal, []

    # --- eager matmul → softmax → matmul -----------------------------------------------------

    def _match_eager(self, pv: torch.fx.Node, notes: list[str]):
        probs, v = pv.args[0], pv.args[1] if len(pv.args) > 1 else None
        chain = []
        node = probs
        if is_call(node, F.dropout):
            if arg(node, 1, "p", 0.5) != 0.0 and arg(node, 2, "training", True):
                return None
            chain.append(node)
            node = node.args[0]
        if is_method(node, "to", "float", "type_as"):
            chain.append(node)
            node = node.args[0]
        if not (is_call(node, *SOFTMAX) or is_method(node, "softmax")):
            return None
        softmax = node
        dim = arg(softmax, 1, "dim")
        if dim not in (-1, 3):
            notes.append(f"{softmax.name}: softmax over dim {dim}, not the key dim; not attention")
            return None
        chain.append(softmax)
        node = softmax.args[0]
        mask = None
        if is_call(node, operator.add, torch.add) and len(node.args) == 2:
            a, b = node.args
            scores_side = a if _is_scores(a) else b
            mask = b if scores_side is a else a
            if not isinstance(mask, torch.fx.Node) or not _is_scores(scores_side):
                return None
            chain.append(node)
            node = scores_side
        scale = 1.0
        if is_call(node, operator.mul, torch.mul, operator.truediv, torch.div) and len(node.args) == 2:
            a, b = node.args
            tensor_side, scalar = (a, b) if isinstance(a, torch.fx.Node) else (b, a)
            if not isinstance(scalar, (int, float)):
                notes.append(f"{node.name}: scores scaled by a tensor; not rewritten")
                return None
            if node.target in (operator.truediv, torch.div):
                if tensor_side is not a:
                    return None
                scalar = 1.0 / scalar
            scale = float(scalar)
            chain.append(node)
            node = tensor_side
        if not (is_call(node, *MATMUL) or is_method(node, "matmul")):
            return None
        qk = node
        chain.append(qk)
        q, kt = qk.args[0], qk.args[1]
        if not (is_method(kt, "transpose") or is_call(kt, torch.transpose)):
            return None
        dims = {d % 4 for d in kt.args[1:3]} if len(kt.args) >= 3 else set()
        if dims != {2, 3}:
            return None
        chain.append(kt)
        k = kt.args[0]
        if any(only_user(n) is None for n in chain):
            notes.append(
                f"{pv.name}: attention weights are read elsewhere (e.g. output_attentions); not rewritten"
            )
            return None
        if not _is_4d(q, k, v):
            return None
        return q, k, v, mask, scale, False, chain


def _is_scores(node) -> bool:
    return isinstance(node, torch.fx.Node) and (
        is_call(node, *MATMUL, operator.mul, torch.mul, operator.truediv, torch.div)
        or is_method(node, "matmul")
    )


def _is_4d(*nodes) -> bool:
    vals = [meta_val(n) for n in nodes]
    if not all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vals):
        return False
    q, k, v = vals
    return q.shape[1] % k.shape[1] == 0 and k.shape[1] == v.shape[1] and q.shape[-1] == k.shape[-1]


def _unrepeat(node):
    """``repeat_kv(x, n)`` (getitem None → expand → reshape) or ``repeat_interleave(x, n, dim=1)`` → x."""
    if not isinstance(node, torch.fx.Node):
        return node
    if is_method(node, "reshape", "view") or is_call(node, *RESHAPE):
        expand = node.args[0]
        if not (is_method(expand, "expand") or is_call(expand, *EXPAND)):
            return node
        unsq = expand.args[0]
        full = slice(None, None, None)
        if is_call(unsq, operator.getitem) and unsq.args[1] == (full, full, None, full, full):
            src = unsq.args[0]
        elif (is_method(unsq, "unsqueeze") or is_call(unsq, *UNSQUEEZE)) and unsq.args[1] == 2:
            src = unsq.args[0]
        else:
            return node
        sv, ov = meta_val(src), meta_val(node)
        if sv is None or ov is None or sv.dim() != 4 or ov.dim() != 4:
            return node
        if ov.shape[1] % sv.shape[1] or (ov.shape[0], ov.shape[2:]) != (sv.shape[0], sv.shape[2:]):
            return node
        return src
    if (is_call(node, *REPEAT_INTERLEAVE) or is_method(node, "repeat_interleave")) and arg(
        node, 2, "dim"
    ) in (1, -3):
        return node.args[0]
    return node
