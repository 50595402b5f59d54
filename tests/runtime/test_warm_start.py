"""Warm start without saved steps (``runtime.step_cache: false``; saved steps: test_step_cache.py):
after torch._dynamo.reset(), the re-traced graphs hit Inductor's FX graph cache and the AOTAutograd
cache (nothing of ours makes the second trace differ), and generate the same tokens."""

from __future__ import annotations

import gc

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_inductor_cache

import zycompile
from zycompile.models import load_model
from zycompile.runtime.compiled import compile_step
from zycompile.tuning import db as tdb
from zycompile.tuning.candidates import DEFAULT
from zycompile.tuning.shapes import collect

PROMPT = [1, 5, 9, 13, 2, 7]


def test_warm_start_hits_inductor_and_aot_caches(tmp_path):
    data = {
        "model": {"source": "tiny:llama"},
        "passes": ["canonicalize_attention", "fuse_projections", "small_gemm"],
        "lowering": {"backend": "inductor"},
        "runtime": {
            "max_seq_len": 64,
            "batch_buckets": [1],
            "prefill_buckets": [16],
            "prefill": "dynamic",
            "step_cache": False,
        },
    }
    model = load_model("tiny:llama").model
    db = tdb.TuningDB(tdb.current_validators("cpu"))  # the default recipe's tuned_gemm, forced on
    for s in collect(zycompile.load_recipe(data), model):
        db.entries[s] = tdb.Entry("onednn", {DEFAULT: 2.0, "onednn": 1.0})
    data["passes"].insert(2, {"name": "tuned_gemm", "db": str(db.save(tmp_path / "db.yaml")), "min_m": 2})
    torch._dynamo.reset()
    with fresh_inductor_cache():
        opt = zycompile.optimize(model, data)
        gen = opt.generator()
        want = gen.generate([PROMPT], max_new_tokens=4, ignore_eos=True).tokens
        assert opt.compile_report().matches("tuned_gemm") > 0
        counters.clear()
        torch._dynamo.reset()
        gc.collect()  # the first graphs and everything they alone kept alive are gone
        gen.compiled_step = compile_step(gen._step, opt.backend)
        gen.seen_shapes.clear()
        assert gen.generate([PROMPT], max_new_tokens=4, ignore_eos=True).tokens == want
    assert counters["inductor"]["fxgraph_cache_hit"] == 2  # dynamic-length prefill and batch-1 decode
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    assert counters["aot_autograd"]["autograd_cache_hit"] == 2
    torch._dynamo.reset()
