"""The recipe's passes on an exported program (ATen graph): applied, re-exported, and fallbacks reported."""

from __future__ import annotations

import pytest
import torch

import zycompile
from zycompile.export.passes import apply_passes, exportable
from zycompile.export.step_module import export_programs
from zycompile.passes.small_gemm import SmallGemmPass
from zycompile.recipe import load_recipe

ATTENTION = torch.ops.zycompile.attention.default
FAST = [
    "lowering.backend=aot_eager",
    "runtime.max_seq_len=64",
    "runtime.prefill_buckets=[8]",
    "runtime.batch_buckets=[1]",
    "passes=[canonicalize_attention, fuse_projections, small_gemm]",
]


@pytest.fixture(scope="module")
def decode():
    torch._dynamo.reset()
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=FAST)
    return opt, export_programs(opt.generator())["decode_b1"]


def _ops(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def _apply(opt, prog, messages):
    return apply_passes("decode_b1", prog.ep, prog.args, None, opt.recipe, 0, {}, messages.append)


def test_passes_rewrite_the_aten_graph(decode):
    opt, prog = decode
    assert torch.ops.aten.linear.default in _ops(prog.ep)  # torch.export keeps linear and SDPA whole
    applied = _apply(opt, prog, [])
    assert {r["name"]: r["matches"] for r in applied.records("decode_b1")} == {
        "canonicalize_attention": 2,
        "fuse_projections": 4,
        "small_gemm": 9,  # 4 per layer + the LM head
    }
    ops = _ops(applied.ep)
    assert torch.ops.aten.linear.default not in ops
    assert torch.ops.aten.scaled_dot_product_attention.default not in ops
    attn = [n for n in applied.ep.graph.nodes if n.target is ATTENTION]
    assert len(attn) == 2
    assert all(n.args[1].meta["val"].shape[1] == 2 for n in attn)  # repeat_kv (aten) dropped: 2 kv heads
    assert any(b.startswith("_zy_fused_") for b in applied.ep.graph_signature.buffers)
    assert applied.warnings == []


def test_a_failing_pass_is_dropped_and_reported(decode, monkeypatch):
    opt, prog = decode

    def boom(self, gm):
        raise RuntimeError("cannot rewrite this")

    monkeypatch.setattr(SmallGemmPass, "__call__", boom)
    messages = []
    applied = _apply(opt, prog, messages)
    names = {r["name"]: r["matches"] for r in applied.records("decode_b1")}
    assert names == {"canonicalize_attention": 2, "fuse_projections": 4}  # the others still applied
    assert applied.warnings == [
        "pass 'small_gemm' failed on the exported graph (RuntimeError: cannot rewrite this); skipped"
    ]
    assert messages == ["decode_b1: " + applied.warnings[0]]  # and said on the progress output
    assert torch.ops.aten.linear.default in _ops(applied.ep)  # the fused GEMMs, unrewritten


def test_a_pass_that_cannot_live_in_a_package_is_left_out():
    recipe = load_recipe("llama-tiny", ["passes=[canonicalize_attention, tuned_gemm]"])
    kept, notes = exportable(recipe)
    assert [p.name for p in kept.passes] == ["canonicalize_attention"]
    assert len(notes) == 1 and notes[0].startswith("pass 'tuned_gemm' not applied in export: ")
