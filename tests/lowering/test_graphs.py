"""runtime.graphs: Inductor cudagraph trees on CUDA/HIP per static-shape (batch-bucket) graph; a no-op on CPU."""

from __future__ import annotations

import torch

import zycompile
from zycompile.lowering.graphs import graph_patches


def test_cuda_captures_static_graphs_only():
    patches, note = graph_patches("auto", "inductor", "cuda")
    assert (
        patches == {"triton.cudagraphs": True, "triton.cudagraph_skip_dynamic_graphs": True} and note is None
    )
    assert graph_patches("on", "inductor", "cuda")[0]["triton.cudagraphs"] is True


def test_off_and_non_inductor():
    assert graph_patches("off", "inductor", "cuda") == ({"triton.cudagraphs": False}, None)
    patches, note = graph_patches("on", "aot_eager", "cuda")
    assert patches == {} and "lowering.backend 'inductor'" in note


def test_cpu_is_a_noop_that_says_so():
    assert graph_patches("auto", "inductor", "cpu") == ({}, None)  # auto: nothing to capture here
    patches, note = graph_patches("on", "inductor", "cpu")
    assert patches == {} and "need a GPU; on cpu the steps run without them" in note
    torch._dynamo.reset()
    opt = zycompile.optimize(
        "tiny:llama",
        "llama-tiny",
        overrides=["lowering.backend=aot_eager", "runtime.graphs=on", "runtime.max_seq_len=64"],
    )
    opt(torch.tensor([[1, 2, 3]]))
    assert any("CUDA/HIP graphs need a GPU" in w for w in opt.compile_report().warnings)
