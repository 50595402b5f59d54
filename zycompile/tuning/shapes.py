"""Shape collection: every distinct GEMM a recipe's graphs will run, read from the captured graphs.

A GEMM is ``linear(x, w, b)`` in the Dynamo graph after the pre-grad passes that come before
``tuned_gemm`` (so fused q/k/v and gate/up show as the one wide GEMM they become). Its key is
``(M, N, K, dtype, weight layout, bias)`` with M = the rows of x (batch x tokens). Collection captures
the recipe's step function for every batch bucket at decode (T = 1) and for every (batch bucket x
prefill bucket) at prefill, with the eager backend (nothing is compiled). A recipe with
``runtime.prefill: dynamic`` runs one symbolic-length prefill graph; its GEMMs are collected at the
bucket lengths, and the tuned pass picks the nearest tuned M at run time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx

from zycompile.passes.base import meta_val
from zycompile.passes.fuse_projections import LINEAR, _k_major
from zycompile.passes.fx_util import real_tensors


@dataclasses.dataclass(frozen=True, order=True)
class GemmShape:
    n: int
    k: int
    m: int
    dtype: str  # "float32", "bfloat16", ...
    layout: str  # weight storage: "row" ([N, K] contiguous) or "kmajor" ([K, N] storage, weight_layout)
    bias: bool

    def label(self) -> str:
        return f"M={self.m} N={self.n} K={self.k} {self.dtype} {self.layout}{' +bias' if self.bias else ''}"

    def family(self) -> tuple:
        """Everything but M: the GEMMs one weight runs."""
        return (self.n, self.k, self.dtype, self.layout, self.bias)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weight_layout(w: torch.Tensor) -> str | None:
    if w.dim() != 2:
        return None
    if w.is_contiguous():
        return "row"
    return "kmajor" if _k_major(w) else None


def decomposed_by_inductor(lowering, shape) -> bool:
    """Whether Inductor's decompose_mm_pass turns this M=1 GEMM into a reduction (CPU limits)."""
    opts = (lowering.options.get("post_grad_fusion_options") or {}).get("decompose_mm_pass")
    if lowering.backend != "inductor" or opts is None or shape.m != 1:
        return False
    limit = opts.get("cpu_max_other_dimension_decomposition", 2048)
    return shape.n <= limit and shape.k <= limit


@dataclasses.dataclass
class GemmSite:
    """One linear node of a graph, with what the tuner and the pass need to know about it."""

    node: torch.fx.Node
    weight: torch.Tensor | None
    m: int | None  # None: symbolic (dynamic prefill)
    shape: GemmShape | None  # None: not tunable (why in `reason`)
    reason: str = ""


def gemm_sites(gm: torch.fx.GraphModule, example_inputs: Iterable[Any]) -> list[GemmSite]:
    tensors = real_tensors(gm, list(example_inputs))
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR:
            continue
        x = meta_val(node.args[0])
        w_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        w = tensors.get(w_node)
        site = GemmSite(node, w, None, None)
        sites.append(site)
        if w is None or not isinstance(x, torch.Tensor):
            site.reason = "weight computed in the graph"
            continue
        layout = weight_layout(w)
        if layout is None or type(w) not in (torch.Tensor, torch.nn.Parameter) or w.dtype != x.dtype:
            site.reason = "weight is not a plain 2-D tensor of the input's dtype"
            continue
        if b_node is not None and b_node not in tensors:
            site.reason = "bias computed in the graph"
            continue
        m = 1
        for d in x.shape[:-1]:
            m = m * d
        site.m = m if isinstance(m, int) else None
        site.shape = GemmShape(
            w.shape[0], w.shape[1], site.m or 0, dtype_name(w.dtype), layout, b_node is not None
        )
    return sites


def collection_recipe(recipe):
    """The recipe as shape collection runs it: eager, bucketed prefill, passes before ``tuned_gemm``."""
    from zycompile.passes import get_pass_class
    from zycompile.recipe import load_recipe

    data = recipe.to_dict()
    passes = []
    for p in data["passes"]:
        if p["name"] == "tuned_gemm":
            break
        if get_pass_class(p["name"]).stage == "pre_grad":
            passes.append(p)
    data["passes"] = passes
    data["lowering"] = {"backend": "eager"}
    data["runtime"]["prefill"] = "buckets"
    data["debug"]["strict"] = False
    return load_recipe(data)


def collect(
    recipe,
    model: torch.nn.Module | None = None,
    progress: Callable[[str], None] | None = None,
    extra_m: tuple[int, ...] = (),
) -> list[GemmShape]:
    """Every distinct GEMM shape of ``recipe``'s prefill and decode graphs, sorted; ``extra_m`` adds
    those row counts for every weight (e.g. speculative verify widths k + 1, which no bucket runs)."""
    import zycompile
    from zycompile.backend import ZyBackend

    rec = collection_recipe(recipe)
    shapes: set[GemmShape] = set()

    class Collector(ZyBackend):
        def __call__(self, gm, example_inputs):
            fn = super().__call__(gm, example_inputs)
            shapes.update(s.shape for s in gemm_sites(gm, example_inputs) if s.shape is not None)
            return fn

    opt = zycompile.optimize(model, rec)
    opt.backend = Collector(rec)
    gen = opt.generator()
    rt = rec.runtime
    for b in rt.batch_buckets:
        for t in (1, *rt.prefill_buckets):
            if progress:
                progress(f"capturing batch {b} x {t} tokens")
            ids = torch.zeros(b, t, dtype=torch.long, device=gen.device)
            pos = torch.arange(t, device=gen.device).expand(b, t).contiguous()
            gen.step(ids, pos, torch.full((b,), t - 1, device=gen.device))
    torch._dynamo.reset()
    shapes |= {dataclasses.replace(s, m=m) for s in shapes for m in extra_m}
    # GEMMs the pass leaves alone (``min_m``: e.g. batch-1/2 GEMVs kept for ``small_gemm``) need no timing.
    min_m = next((p.options.min_m for p in recipe.passes if p.name == "tuned_gemm"), 1)
    return sorted(s for s in shapes if s.m >= min_m)
