"""Shape collection: every GEMM of a tiny model's prefill and decode graphs, counted exactly."""

from __future__ import annotations

import pytest
import torch

from zycompile.models import load_model
from zycompile.recipe import load_recipe
from zycompile.tuning.shapes import GemmShape, collect, collection_recipe, decomposed_by_inductor


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def expected_shapes(cfg, batches, prefills) -> set[GemmShape]:
    """What fuse_projections makes of a Llama: fused qkv, o, fused gate/up, down; the head on [B, K]."""
    hd = cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    h, i = cfg.hidden_size, cfg.intermediate_size
    layer = [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]
    ms = set(batches) | {b * t for b in batches for t in prefills}
    out = {GemmShape(n, k, m, "float32", "row", False) for n, k in layer for m in ms}
    out |= {
        GemmShape(cfg.vocab_size, h, b, "float32", "row", False) for b in batches
    }  # head: last token per row
    return out


def test_collect_finds_every_gemm_of_tiny_llama():
    recipe = load_recipe("llama-tiny")
    model = load_model("tiny:llama").model
    shapes = collect(recipe, model)
    rt = recipe.runtime
    want = expected_shapes(model.config, rt.batch_buckets, rt.prefill_buckets)
    assert set(shapes) == want
    # batch buckets 1, 2, 4 x prefill 16, 64: M in {1, 2, 4, 16, 32, 64, 128, 256}; 4 GEMMs a layer + head at M=B
    assert len(shapes) == 4 * 8 + 3 == 35
    assert shapes == sorted(shapes) and len(set(shapes)) == len(shapes)


def test_collect_sees_weight_layout_and_skips_the_tuned_pass_itself():
    recipe = load_recipe(
        {
            "model": {"source": "tiny:llama"},
            "passes": [
                "weight_layout",
                "fuse_projections",
                {"name": "tuned_gemm", "db": "/nonexistent.yaml"},
            ],
            "runtime": {
                "max_seq_len": 64,
                "batch_buckets": [2],
                "prefill_buckets": [8],
                "prefill": "dynamic",
            },
        }
    )
    rec = collection_recipe(recipe)
    assert [p.name for p in rec.passes] == ["weight_layout", "fuse_projections"]
    assert rec.lowering.backend == "eager" and rec.runtime.prefill == "buckets"
    shapes = collect(recipe, load_model("tiny:llama").model)
    assert {s.layout for s in shapes} == {"kmajor"}  # weight_layout ran before capture
    assert {s.m for s in shapes} == {2, 16}


def test_decompose_mm_rule_matches_inductor_limits():
    recipe = load_recipe(
        {
            "model": {"source": "smollm2-135m-instruct"},
            "lowering": {"options": {"post_grad_fusion_options": {"decompose_mm_pass": {}}}},
        }
    )
    low = recipe.lowering
    assert decomposed_by_inductor(low, GemmShape(960, 576, 1, "float32", "kmajor", False))
    assert not decomposed_by_inductor(low, GemmShape(3072, 576, 1, "float32", "kmajor", False))  # N > 2048
    assert not decomposed_by_inductor(low, GemmShape(49152, 576, 1, "float32", "kmajor", False))
    assert not decomposed_by_inductor(low, GemmShape(960, 576, 2, "float32", "kmajor", False))
    assert not decomposed_by_inductor(
        load_recipe("llama-tiny").lowering, GemmShape(64, 64, 1, "float32", "row", False)
    )
