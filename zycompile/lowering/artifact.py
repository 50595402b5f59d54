"""A lowered graph that can be saved and loaded in another process (the step artifact cache).

Inductor's compiled function is serializable on its own (AOTAutograd's bundled cache entry, which
``torch.compile(...).aot_compile`` pickles), but two things it runs with live outside it:

- buffers our passes added to the graph (``fuse_projections``' fused weights): AOTAutograd passes
  them as leading inputs, and a loaded entry has none. They are views of the model's own weight
  storage, so each is saved as (graph input whose storage it views, size, stride, offset) and
  rebuilt from that input at the first call: no weight bytes in the artifact.
- ``tuned_gemm``'s plans (M -> candidate per weight, ``ops/tuned_linear.py``): saved as tables and
  reinstalled at load under the same ids.
- our C++ CPU kernels, which ``small_gemm`` and ``tuned_gemm`` call (``zycompile_cpu::*``, directly or
  through ``tuned_linear`` when a plan names one):
  a new process has not loaded that extension until something asks for it, so a loaded graph that
  calls it loads it first (a decode step whose graph ran before any prefill failed with "no
  attribute 'panel_linear'").

A graph whose buffers are not views of an input (no such pass today) is not savable; ``wrap``
returns None and the caller compiles the usual way.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.fx
from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable, SerializableCallable

from zycompile.ops import cpu_kernels, tuned_linear

View = tuple[int, tuple[int, ...], tuple[int, ...], int]  # (input index, size, stride, storage offset)


class SavedGraph(SerializableCallable):
    def __init__(
        self,
        compiled: Any,
        views: list[View],
        plans: dict[int, dict[int, str]],
        loaded: bool,
        cpu_kernels: bool = False,
    ):
        self.compiled = compiled
        self.cpu_kernels = cpu_kernels  # the graph calls zycompile_cpu ops
        self.views = views
        self.plans = plans
        self.loaded = loaded  # a loaded entry takes the buffers as leading inputs; a live one has them
        self._inputs = [v[0] for v in views]  # graph inputs the buffers view
        self._buffers: list[torch.Tensor] | None = None
        self._sources: list[torch.Tensor] = []

    @classmethod
    def wrap(cls, compiled: Any, gm: torch.fx.GraphModule, example_inputs: list) -> SavedGraph | None:
        if not hasattr(compiled, "serialize"):
            return None  # not a bundled AOTAutograd entry (aot_eager, eager)
        views = []
        # AOTAutograd's order: parameters, then buffers (Dynamo graphs have no parameters of their own)
        for t in [*gm.parameters(), *gm.buffers()]:
            ptr = t.untyped_storage().data_ptr()
            idx = next(
                (
                    i
                    for i, x in enumerate(example_inputs)
                    if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() == ptr
                ),
                None,
            )
            if idx is None:
                return None
            views.append((idx, tuple(t.shape), t.stride(), t.storage_offset()))
        plans = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.zycompile.tuned_linear.default:
                pid = node.args[3]
                plans[pid] = dict(tuned_linear.PLANS[pid].table)
        calls_cpu = any(
            node.op == "call_function" and getattr(node.target, "namespace", None) == "zycompile_cpu"
            for node in gm.graph.nodes
        )
        return cls(compiled, views, plans, loaded=False, cpu_kernels=calls_cpu)

    def __call__(self, *args: Any) -> Any:
        if not self.loaded:
            return self.compiled(*args)
        if self._buffers is None or any(args[i] is not s for i, s in zip(self._inputs, self._sources)):
            self._sources = [args[i] for i in self._inputs]
            self._buffers = [
                torch.as_strided(args[i], size, stride, offset) for i, size, stride, offset in self.views
            ]
        return self.compiled(*self._buffers, *args)

    @classmethod
    def serialize_compile_artifacts(cls, fn: SavedGraph) -> bytes:
        inner = BundledAOTAutogradSerializableCallable(fn.compiled)
        blob = BundledAOTAutogradSerializableCallable.serialize_compile_artifacts(inner)
        return pickle.dumps((blob, fn.views, fn.plans, fn.cpu_kernels))

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> SavedGraph:
        blob, views, plans, calls_cpu = pickle.loads(data)
        # tuned_gemm's plans reach the same kernels through tuned_linear when a C++ candidate won
        calls_cpu = calls_cpu or any(
            n in cpu_kernels.SMALL_GEMM_OPS for t in plans.values() for n in t.values()
        )
        if calls_cpu and (why := cpu_kernels.build()) is not None:
            raise RuntimeError(
                f"the saved graph calls zycompile's C++ CPU kernels, which cannot load here ({why})"
            )
        compiled = BundledAOTAutogradSerializableCallable.deserialize_compile_artifacts(blob)
        for pid, table in plans.items():
            tuned_linear.install(pid, table)
        return cls(compiled, views, plans, loaded=True, cpu_kernels=calls_cpu)
