"""SavedGraph (lowering/artifact.py): a saved graph that calls our C++ CPU kernels loads them when it is
loaded (directly, or through a tuned_gemm plan that names one), since nothing else in a fresh process may have (a decode step run before any prefill failed with
"no attribute 'panel_linear'"); one that cannot load them fails to load, so the step cache rebuilds it."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.fx

from zycompile.lowering import artifact
from zycompile.lowering.artifact import SavedGraph
from zycompile.ops import cpu_kernels, tuned_linear


class Compiled:
    def serialize(self):  # what marks a bundled AOTAutograd entry
        return b""

    def __call__(self, *args):
        return args


def graph(calls_cpu: bool) -> torch.fx.GraphModule:
    g = torch.fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    if calls_cpu:
        if cpu_kernels.build() is not None:
            pytest.skip("C++ kernels unavailable")
        out = g.call_function(torch.ops.zycompile_cpu.panel_linear.default, (x, w))
    else:
        out = g.call_function(torch.nn.functional.linear, (x, w))
    g.output(out)
    return torch.fx.GraphModule(torch.nn.Module(), g)


def test_wrap_records_whether_the_graph_calls_the_cpu_kernels():
    inputs = [torch.randn(2, 4), torch.randn(3, 4)]
    assert SavedGraph.wrap(Compiled(), graph(True), inputs).cpu_kernels
    assert not SavedGraph.wrap(Compiled(), graph(False), inputs).cpu_kernels


@pytest.fixture
def loads(monkeypatch):
    """Deserialize without a real Inductor entry; record the kernel builds asked for."""
    built, why = [], {"value": None}
    monkeypatch.setattr(
        artifact.BundledAOTAutogradSerializableCallable,
        "deserialize_compile_artifacts",
        lambda blob: Compiled(),
    )

    def build():
        built.append(1)
        return why["value"]

    monkeypatch.setattr(cpu_kernels, "build", build)
    return built, why


def test_loading_a_graph_that_calls_the_kernels_loads_them_first(loads):
    built, why = loads
    g = SavedGraph.deserialize_compile_artifacts(pickle.dumps((b"blob", [], {}, True)))
    assert g.loaded and g.cpu_kernels and built == [1]
    SavedGraph.deserialize_compile_artifacts(pickle.dumps((b"blob", [], {}, False)))
    assert built == [1]  # a graph without them does not build them
    plans = {10**9: {4: "panel_linear", 64: "onednn"}}  # a tuned_gemm plan whose winner is a C++ kernel
    try:
        SavedGraph.deserialize_compile_artifacts(pickle.dumps((b"blob", [], plans, False)))
    finally:
        tuned_linear.PLANS.pop(10**9, None)
    assert built == [1, 1]
    why["value"] = "no C++ compiler"
    with pytest.raises(RuntimeError, match=r"calls zycompile's C\+\+ CPU kernels.*no C\+\+ compiler"):
        SavedGraph.deserialize_compile_artifacts(pickle.dumps((b"blob", [], {}, True)))
