"""Fuse all-gather→matmul and matmul→reduce-scatter pairs into ops that overlap transfer and GEMM.

TP with sequence parallelism (``parallel.sequence_parallel``) gathers the sequence-sharded block
input before q/k/v (gate/up) and reduce-scatters o_proj (down_proj) back onto the sequence. The
post-grad graph of one attention block at degree 2, batch 1, 8 tokens (DTensor's redistribute
shows as a view, or split+cat for batch > 1)::

    all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(mul_4, 2, '0')   # [2, 4, 64]
    wait_tensor_1 = _c10d_functional.wait_tensor(all_gather_into_tensor)
    view_2 = aten.view(wait_tensor_1, [1, 8, 64])
    mm = aten.mm(aten.view(view_2, [8, 64]), permute)        # q_proj; k_proj and v_proj alike
    ...
    mm_3 = aten.mm(view_20, permute_9)                       # o_proj, [8, 64] partial sums
    split_3 = aten.split(aten.view(mm_3, [1, 8, 64]), 4, 1); cat_3 = aten.cat([split_3[0], split_3[1]])
    reduce_scatter_tensor_1 = _c10d_functional.reduce_scatter_tensor(cat_3, 'sum', 2, '0')
    wait_tensor_2 = _c10d_functional.wait_tensor(reduce_scatter_tensor_1)             # [1, 4, 64]

After::

    all_gather_matmul = zycompile.all_gather_matmul(mul_4, [permute, permute_2, permute_4], [], 1, '0', 'ring')
    mm = aten.view(all_gather_matmul[0], [8, 32])            # likewise mm_1, mm_2
    ...
    matmul_reduce_scatter = zycompile.matmul_reduce_scatter(aten.reshape(view_20, [1, 8, 32]), permute_9, 1, '0', 'ring')

One gather that feeds several GEMMs becomes one op with every weight (q/k/v: one group). The ops
(``ops/overlap_ops.py``) run the ring from ``ops/overlap.py`` — chunk i+1 travels (P2P) while chunk
i is multiplied — on any backend (gloo on CPU), or PyTorch's symmetric-memory fused ops on CUDA.
Both are exact reorderings of the same products and sums (fp32: equal within rounding).

Post-grad stage, for both lowerings (aot_eager's forward compiler and Inductor's
``post_grad_custom_post_pass``): only there are the collectives explicit functional ops with their
``wait_tensor`` and ``linear`` an ``mm``; the Dynamo graph holds DTensor ``redistribute`` calls.
(Inductor's own ``_micro_pipeline_tp`` does a similar rewrite for CUDA symmetric memory only.)

Left alone, and counted in the notes: a gather whose result feeds anything but GEMMs (the final
norm's gather for the LM head), a reduce-scatter whose input is not a lone GEMM's output, GEMMs with
a bias before a reduce-scatter, weights computed from activations, tensors under ``min_bytes``,
symbolic shapes (``prefill: dynamic``: the ring needs static chunk sizes here; left correct, unfused).
Decode graphs under sequence parallelism run as plain TP (all-reduces): nothing to match there.

TSP's ring steps (``parallel/tsp*.py``) run as Python P2P inside their own code, not as functional
collectives in the graph, so they are not visible here; their overlap belongs in that ring (post
the next send before the GEMM, as ``ops/overlap.py`` does). If TSP's steps become graph ops, add a
matcher with ``register_matcher`` — it runs after the two built-in patterns with the same options.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Callable
from typing import Literal

import torch
import torch.fx

from zycompile.ops.overlap_ops import symm_mem_available
from zycompile.passes import register_pass
from zycompile.passes.base import GraphPass, PassResult, is_call, meta_val
from zycompile.passes.fx_util import erase_if_dead, propagate_meta

log = logging.getLogger("zycompile")
aten, c10d = torch.ops.aten, torch.ops._c10d_functional
ALL_GATHER, REDUCE_SCATTER, WAIT = (
    c10d.all_gather_into_tensor.default,
    c10d.reduce_scatter_tensor.default,
    c10d.wait_tensor.default,
)
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)
# Ops that only re-lay a weight: such a chain over graph inputs may move before the fused op.
WEIGHT_LAYOUT = (aten.permute.default, aten.t.default, aten.transpose.int, *VIEWS)

Matcher = Callable[[torch.fx.GraphModule, "OverlapCommPass"], tuple[int, list[str]]]
_MATCHERS: list[Matcher] = []


def register_matcher(fn: Matcher) -> Matcher:
    """Extra pattern (e.g. TSP ring steps): ``fn(gm, pass) -> (rewrites, notes)``."""
    _MATCHERS.append(fn)
    return fn


class Refused(Exception):
    """A candidate the pass leaves alone; the message says why (it goes to the notes)."""


def _shape(node) -> list[int]:
    val = meta_val(node)
    if not isinstance(val, torch.Tensor):
        raise Refused(f"{getattr(node, 'name', node)} has no recorded shape")
    if any(not isinstance(s, int) for s in val.shape):
        raise Refused(f"{node.name} has a symbolic shape")
    return list(val.shape)


def _nbytes(node, shape: list[int]) -> int:
    return math.prod(shape) * meta_val(node).element_size()


def _pieces(split: torch.fx.Node, world: int) -> list[torch.fx.Node] | None:
    """The ``world`` getitems of an equal split, in order, or None."""
    items = {u.args[1]: u for u in split.users if u.target is operator.getitem}
    if sorted(items) != list(range(world)) or len(split.users) != world:
        return None
    return [items[i] for i in range(world)]


def _whole_slice(node) -> bool:
    """``slice(x, d, 0, >= size)`` (DTensor emits one when it un-pads a gather): the same tensor."""
    if not is_call(node, aten.slice.Tensor) or node.kwargs:
        return False
    defaults = [0, None, None, 1]  # dim, start, end, step
    _, start, _, step = list(node.args[1:]) + defaults[len(node.args) - 1 :]
    return start in (0, None) and step == 1 and _shape(node) == _shape(node.args[0])


@register_pass
class OverlapCommPass(GraphPass):
    name = "overlap_comm"
    stage = "post_grad"
    # Decode graphs under sequence parallelism have nothing to fuse; the notes say what was seen.
    expect_matches = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        all_gather_matmul: bool = True  # fuse all_gather -> wait -> mm groups
        matmul_reduce_scatter: bool = True  # fuse mm -> reduce_scatter -> wait
        min_bytes: int = 0  # leave collectives moving fewer bytes (gathered / pre-scatter tensor)
        impl: Literal["auto", "ring", "symm_mem"] = "auto"  # auto: symm_mem on CUDA if present, else ring

        def check(self):
            if self.min_bytes < 0:
                yield "min_bytes", f"got {self.min_bytes!r}; expected an integer >= 0"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        notes: list[str] = []
        par = self.ctx.recipe.parallel
        if not (par.mode == "tp" and par.sequence_parallel) and not self.ctx.state.get("overlap_comm_warned"):
            self.ctx.state["overlap_comm_warned"] = True
            log.warning(
                "pass 'overlap_comm' needs parallel: {mode: tp, sequence_parallel: true} to find "
                "all-gather/reduce-scatter pairs; without it the graphs hold all-reduces only"
            )
        counts = {"all_gather_matmul": 0, "matmul_reduce_scatter": 0, "left alone": 0}
        gm_nodes = list(gm.graph.nodes)
        for node in gm_nodes:
            kind = (
                "all_gather_matmul"
                if node.target is ALL_GATHER
                else "matmul_reduce_scatter"
                if node.target is REDUCE_SCATTER
                else None
            )
            if kind is None or getattr(node, "_erased", False) or node.graph is not gm.graph:
                continue
            try:
                if not getattr(self.opts, kind):
                    raise Refused(f"{kind} disabled by the options")
                (self._gather if kind == "all_gather_matmul" else self._scatter)(gm, node)
                counts[kind] += 1
            except Refused as why:
                counts["left alone"] += 1
                notes.append(f"{node.name} left alone: {why}")
        extra = 0
        for matcher in _MATCHERS:
            n, more = matcher(gm, self)
            extra += n
            notes.extend(more)
        matches = counts["all_gather_matmul"] + counts["matmul_reduce_scatter"] + extra
        if matches:
            gm.graph.lint()
            gm.recompile()
        notes.insert(0, ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
        if not any(n.target in (ALL_GATHER, REDUCE_SCATTER) for n in gm_nodes):
            notes.append("no all-gather or reduce-scatter in this graph")
        self.ctx.state.setdefault("overlap_comm", []).append(counts)
        return PassResult(bool(matches), matches, notes)

    # ---- helpers --------------------------------------------------------------------------------

    def _impl(self, node: torch.fx.Node) -> str:
        if self.opts.impl != "auto":
            return self.opts.impl
        val = meta_val(node)
        return "symm_mem" if val is not None and val.is_cuda and symm_mem_available() else "ring"

    def _big_enough(self, node, shape) -> None:
        if _nbytes(node, shape) < self.opts.min_bytes:
            raise Refused(f"{_nbytes(node, shape)} bytes < min_bytes {self.opts.min_bytes}")

    # ---- all_gather(x) -> wait -> [view | split+cat] -> view to 2-D -> mm/addmm ---------------

    def _gather(self, gm: torch.fx.GraphModule, ag: torch.fx.Node) -> None:
        x, world, group = ag.args[0], ag.args[1], ag.args[2]
        wait = next(iter(ag.users)) if len(ag.users) == 1 else None
        if not is_call(wait, WAIT):
            raise Refused("all_gather not followed by one wait_tensor")
        xs = _shape(x)
        fulls, dim = self._gathered(wait, xs, world)
        full = list(xs)
        full[dim] *= world
        self._big_enough(x, full)
        flat = [math.prod(full[:-1]), full[-1]]  # the GEMM operand: every gathered row, in order
        mms, layout = [], []  # GEMMs reading the gathered tensor; views between
        work = list(fulls)
        while work:
            n = work.pop()
            for u in n.users:
                if (is_call(u, *VIEWS) or _whole_slice(u)) and u.args[0] is n:
                    layout.append(u)
                    work.append(u)
                elif is_call(u, aten.mm.default) and u.args[0] is n and _shape(n) == flat:
                    mms.append((u, u.args[1], None))
                elif (
                    is_call(u, aten.addmm.default)
                    and u.args[1] is n
                    and len(u.args) == 3
                    and _shape(n) == flat
                ):
                    if u.kwargs:
                        raise Refused(f"{u.name} scales its inputs (addmm beta/alpha)")
                    mms.append((u, u.args[2], u.args[0]))
                else:
                    raise Refused(f"the gathered tensor also feeds {u.name} ({u.target}), not only GEMMs")
        if not mms:
            raise Refused("the gathered tensor feeds no GEMM")
        if len({b is None for _, _, b in mms}) > 1:
            raise Refused("some GEMMs of this gather have a bias and some do not")
        for mm, w, b in mms:
            if self._needs_activation(w) or (b is not None and self._needs_activation(b)):
                raise Refused(f"the weight of {mm.name} is computed from activations")
        with gm.graph.inserting_before(wait):
            for _, w, b in mms:
                for t in (w, b):
                    if t is not None:
                        self._hoist(t, wait)
            ws = [w for _, w, _ in mms]
            bs = [b for _, _, b in mms if b is not None]
            fused = gm.graph.call_function(
                torch.ops.zycompile.all_gather_matmul.default,
                (x, ws, bs, dim, group, self._impl(x)),
            )
            propagate_meta(fused)
        for i, (mm, _, _) in enumerate(mms):
            with gm.graph.inserting_before(mm):
                item = gm.graph.call_function(operator.getitem, (fused, i))
                item.meta["val"] = meta_val(fused)[i]
                flat = gm.graph.call_function(aten.view.default, (item, _shape(mm)))
                propagate_meta(flat)
            mm.replace_all_uses_with(flat)
            gm.graph.erase_node(mm)
        erase_if_dead([*layout, *fulls, wait])

    def _gathered(self, wait: torch.fx.Node, xs: list[int], world: int) -> tuple[list[torch.fx.Node], int]:
        """The node holding the gathered tensor and its gather dim: ``split(B, 0)`` + ``cat(dim)`` (how
        DTensor gathers a ``Shard(1)`` tensor of batch B > 1), else the wait itself on dim 0 — views
        keep its row order, so any view chain to a GEMM reads the rank chunks in dim-0 order."""
        users = list(wait.users)
        split = users[0] if len(users) == 1 and is_call(users[0], *SPLITS) else None
        if split is None:
            return [wait], 0
        sizes = split.args[1]
        even = sizes == xs[0] or (isinstance(sizes, (list, tuple)) and set(sizes) == {xs[0]})
        pieces = _pieces(split, world) if even and (split.args[2:] or [0])[0] == 0 else None
        cats = {c for p in pieces or [] for c in p.users}
        cat = next(iter(cats)) if len(cats) == 1 else None
        if not (is_call(cat, aten.cat.default) and list(cat.args[0]) == pieces):
            raise Refused("the gathered chunks are not concatenated in rank order")
        return [cat], (cat.args[1] if len(cat.args) > 1 else 0) % len(xs)

    @staticmethod
    def _needs_activation(t: torch.fx.Node) -> bool:
        """Whether ``t`` is anything but a re-laid graph input (a weight)."""
        while is_call(t, *WEIGHT_LAYOUT):
            t = t.args[0]
        return not (isinstance(t, torch.fx.Node) and t.op in ("placeholder", "get_attr"))

    @staticmethod
    def _hoist(t: torch.fx.Node, before: torch.fx.Node) -> None:
        """Move a weight's layout chain before ``before`` (it reads only graph inputs)."""
        chain = []
        while is_call(t, *WEIGHT_LAYOUT):
            chain.append(t)
            t = t.args[0]
        order = {n: i for i, n in enumerate(before.graph.nodes)}
        for n in reversed(chain):
            if order[n] > order[before]:
                before.prepend(n)

    # ---- mm -> view -> [split(dim)+cat] -> reduce_scatter -> wait ----------------------------

    def _scatter(self, gm: torch.fx.GraphModule, rs: torch.fx.Node) -> None:
        inp, op, world, group = rs.args[:4]
        if op != "sum":
            raise Refused(f"reduce op '{op}' (only 'sum' is fused)")
        wait = next(iter(rs.users)) if len(rs.users) == 1 else None
        if not is_call(wait, WAIT):
            raise Refused("reduce_scatter not followed by one wait_tensor")
        layout = []
        y, dim = inp, 0
        if is_call(inp, aten.cat.default) and (inp.args[1] if len(inp.args) > 1 else 0) == 0:
            split = inp.args[0][0].args[0] if inp.args[0] else None
            pieces = _pieces(split, world) if is_call(split, *SPLITS) else None
            if pieces is None or list(inp.args[0]) != pieces or any(len(p.users) != 1 for p in pieces):
                raise Refused("the scattered tensor is not an in-order split of one tensor")
            y = split.args[0]
            dim = (split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)) % len(_shape(y))
            layout += [inp, *pieces, split]
        ys = _shape(y)
        if ys[dim] % world:
            raise Refused(f"dim {dim} of size {ys[dim]} does not split over {world} ranks")
        n = y
        while is_call(n, *VIEWS):
            if len(n.users) != 1:
                raise Refused(f"{n.name} is read by more than the reduce-scatter")
            layout.append(n)
            n = n.args[0]
        if is_call(n, aten.addmm.default):
            raise Refused(f"{n.name} adds a bias before the reduce-scatter")
        if not is_call(n, aten.mm.default):
            raise Refused(f"the scattered tensor comes from {getattr(n, 'name', n)}, not a GEMM")
        if len(n.users) != 1:
            raise Refused(f"{n.name} is read by more than the reduce-scatter")
        a, w = n.args
        k = _shape(a)[-1]
        self._big_enough(y, ys)
        with gm.graph.inserting_before(wait):
            a3 = gm.graph.call_function(aten.reshape.default, (a, ys[:-1] + [k]))
            propagate_meta(a3)
            fused = gm.graph.call_function(
                torch.ops.zycompile.matmul_reduce_scatter.default, (a3, w, dim, group, self._impl(a))
            )
            propagate_meta(fused)
        wait.replace_all_uses_with(fused)
        gm.graph.erase_node(wait)
        gm.graph.erase_node(rs)
        erase_if_dead([*layout, n])
