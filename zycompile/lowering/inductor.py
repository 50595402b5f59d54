"""Lower a (pre-grad rewritten) Dynamo graph: Inductor, aot_eager or eager, post-grad passes included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from zycompile.pipeline import PassManager


class PostGradHook(CustomGraphPass):
    """Installed as Inductor's ``post_grad_custom_post_pass``; its uuid keys Inductor's FX graph cache."""

    def __init__(self, manager: PassManager):
        self.manager = manager

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.manager.run(graph.owning_module)

    def uuid(self) -> Any:
        return self.manager.uuid()

    def __deepcopy__(self, memo) -> PostGradHook:
        # AOTInductor deep-copies its config patches: a copy would report into a copied report (lost)
        # and copy the recipe, example inputs and shared pass state. The hook is shared, never copied.
        return self


# Inductor's per-call checks that runtime sizes, strides and alignment match what it compiled for: a
# few hundred Python calls a SmolLM2 step (~4 ms of a 58 ms batch-8 step here, interleaved A/B). They
# never fire on a correctly compiled graph; vLLM turns them off for serving too. ``lowering.options``
# turns them back on for debugging (``size_asserts: true``).
SERVING_DEFAULTS = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}


def inductor_patches(
    lowering, post: PassManager, graph_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    patches: dict[str, Any] = {
        k: v for k, v in SERVING_DEFAULTS.items() if hasattr(torch._inductor.config, k)
    }
    if lowering.mode != "default":
        patches.update(torch._inductor.list_mode_options(lowering.mode))
    patches.update(graph_options or {})
    patches.update(dict(lowering.options))
    # Always installed, even with no post-grad passes: its uuid carries the recipe hash into the cache key.
    patches["post_grad_custom_post_pass"] = PostGradHook(post)
    return patches


def lower(
    gm: torch.fx.GraphModule, example_inputs: list, lowering, post: PassManager, graph_options=None
) -> Callable:
    if lowering.backend == "eager":
        return gm.forward
    if lowering.backend == "aot_eager":
        return _aot_eager(gm, example_inputs, post)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=inductor_patches(lowering, post, graph_options))


def _aot_eager(gm, example_inputs, post: PassManager) -> Callable:
    """AOT-traced (functionalized, Inductor-decomposed) graph run eagerly: post-grad passes see the same IR."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def fw_compiler(g: torch.fx.GraphModule, _inputs):
        if post:
            post.run(g)
            g.recompile()
        return make_boxed_func(g.forward)

    def bw_compiler(g: torch.fx.GraphModule, _inputs):
        return make_boxed_func(g.forward)

    return aot_autograd(
        fw_compiler=fw_compiler, bw_compiler=bw_compiler, decompositions=select_decomp_table()
    )(gm, example_inputs)
