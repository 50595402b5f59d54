"""Saved compiled steps (``runtime/step_cache.py``): a new process loads them instead of tracing with
Dynamo and generates the same tokens; a corrupt entry is rebuilt; where steps cannot be saved the
runtime says why and traces as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import zycompile
from zycompile.models import load_model
from zycompile.runtime import step_cache
from zycompile.runtime.eagle import EagleHead, save_head
from zycompile.tuning import db as tdb
from zycompile.tuning.candidates import DEFAULT
from zycompile.tuning.shapes import collect

# 21 tokens with a 16-token chunk: two prefill chunks, the second reading more keys than it writes
PROMPT = [1, 5, 9, 13, 2, 7, 11, 3, 8, 4, 6, 10, 12, 14, 15, 16, 17, 18, 19, 20, 21]

CHILD = textwrap.dedent(
    """
    import json, sys
    import zycompile
    from zycompile.ops.tuned_linear import PLANS
    opt = zycompile.optimize(None, json.loads(sys.argv[1]))
    gen = opt.generator()
    said = []
    gen.on_compile = said.append
    out = gen.generate([json.loads(sys.argv[2])], max_new_tokens=6, ignore_eos=True)
    st, spec = gen.compiled_step, gen.speculator
    fwd = spec.compiled_forward if spec else None
    drf = getattr(spec.drafter, "compiled", None) if spec else None
    print("RESULT " + json.dumps(
        {"tokens": out.tokens, "loaded": st.loaded, "saved": st.saved, "traced": len(opt.compile_report().graphs),
         "plans_used": sum(1 for p in PLANS.values() if p.table and p.states), "said": said,
         "verify": fwd and {"loaded": fwd.loaded, "saved": fwd.saved, "ran": spec.stats.drafted > 0, "dir": str(fwd.dir)},
         "draft": drf and {"loaded": drf.loaded, "saved": drf.saved}}
    ))
    """
)


def recipe(tmp_path, backend="inductor"):
    data = {
        "model": {"source": "tiny:llama"},
        "passes": ["canonicalize_attention", "fuse_projections", "small_gemm"],
        "lowering": {"backend": backend},
        "runtime": {"max_seq_len": 64, "batch_buckets": [1], "prefill_buckets": [16], "prefill": "dynamic"},
    }
    # tuned_gemm forced on every prefill shape (oneDNN; M <= 8 GEMMs are small_gemm's): its plans
    # must come back with a loaded step
    db = tdb.TuningDB(tdb.current_validators("cpu"))
    for s in collect(zycompile.load_recipe(data), load_model("tiny:llama").model):
        db.entries[s] = tdb.Entry("onednn", {DEFAULT: 2.0, "onednn": 1.0})
    data["passes"].insert(2, {"name": "tuned_gemm", "db": str(db.save(tmp_path / "db.yaml")), "min_m": 1})
    return data


def child(data, cache) -> dict:
    env = {**os.environ, "ZYCOMPILE_STEP_CACHE": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(data), json.dumps(PROMPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return {**json.loads(line[len("RESULT ") :]), "stderr": proc.stderr}


@pytest.mark.inductor
@pytest.mark.full  # the EAGLE test below runs the same checks on a recipe with more graphs
def test_new_process_loads_saved_steps_and_generates_the_same_tokens(tmp_path):
    data = recipe(tmp_path)
    cache = tmp_path / "steps"
    want = zycompile.optimize(None, recipe(tmp_path, backend="aot_eager")).generator()
    want = want.generate([PROMPT], max_new_tokens=6, ignore_eos=True).tokens

    cold = child(data, cache)
    assert cold["tokens"] == want
    assert cold["loaded"] == 0 and cold["saved"] >= 2 and cold["traced"] == cold["saved"]
    assert cold["said"] and all(m.startswith("compiling ") for m in cold["said"])

    warm = child(data, cache)
    assert warm["tokens"] == want
    assert warm["loaded"] == cold["saved"] and warm["saved"] == 0
    assert warm["traced"] == 0  # no graph reached the backend: Dynamo traced nothing
    assert [m.replace("loading saved ", "compiling ") for m in warm["said"]] == cold["said"]
    assert warm["plans_used"] == cold["plans_used"] > 0  # tuned_gemm's plans came back and ran

    files = sorted(cache.rglob("*.bin"))
    files[0].write_bytes(b"not a saved step")
    again = child(data, cache)
    assert again["tokens"] == want
    assert "ignoring unreadable saved step" in again["stderr"]
    assert again["saved"] == 1 and again["loaded"] == cold["saved"] - 1


def owner(backend="inductor", device="cpu", **runtime):
    data = {"model": {"source": "tiny:llama"}, "lowering": {"backend": backend}, "runtime": runtime}
    return SimpleNamespace(recipe=zycompile.load_recipe(data), device=torch.device(device))


def test_usable_says_why_not():
    if step_cache.usable(owner()) is not None:
        pytest.skip(f"step cache unavailable here: {step_cache.usable(owner())}")
    assert "step_cache is off" in step_cache.usable(owner(step_cache=False))
    assert "aot_eager" in step_cache.usable(owner(backend="aot_eager"))
    assert "CUDA/HIP graphs" in step_cache.usable(owner(device="cuda"))


def test_marks_split_signatures_and_strip_and_restore():
    plain, marked = torch.zeros(1, 8), torch.zeros(1, 8)
    torch._dynamo.maybe_mark_dynamic(marked, 1)
    assert step_cache._signature((plain, None)) != step_cache._signature((marked, None))
    removed = step_cache._strip_marks((plain, marked, None))
    assert not hasattr(marked, "_dynamo_weak_dynamic_indices") and removed
    step_cache._restore_marks(removed)
    assert marked._dynamo_weak_dynamic_indices == {1}


def test_thread_count_splits_signatures():
    """A step compiled at another intra-op thread count is another graph (the engine's prefill worker
    runs at half the threads): it gets its own saved file, not a guard failure on every call."""
    from zycompile.intraop import threads

    args = (torch.zeros(1, 8), None)
    with threads(1):
        one = step_cache._signature(args)
    with threads(2):
        two = step_cache._signature(args)
    assert one != two and step_cache._stem(one) != step_cache._stem(two)
    assert step_cache._describe(one) == step_cache._describe(two) == "([1, 8], None)"


def test_the_key_is_the_same_for_a_like_model_in_another_object():
    """A new process builds new objects: the key must not depend on their identity. It once took the
    repr of ``Generator.step_key`` (a bound method, an address), so no saved target step loaded again."""
    data = {"model": {"source": "tiny:llama"}, "lowering": {"backend": "aot_eager"}}
    a = zycompile.optimize(None, data).generator()
    b = zycompile.optimize(None, data).generator()
    assert a is not b and step_cache.model_key(a, "_step") == step_cache.model_key(b, "_step")
    b.step_cache_extra = "a draft head's file hash"  # what the step reads beyond the parameters
    assert step_cache.model_key(a, "_step") != step_cache.model_key(b, "_step")


def test_a_step_that_cannot_be_saved_is_traced_alone(monkeypatch, caplog, tmp_path):
    """One graph whose capture fails (batch 4 here) is compiled by Dynamo; the other signatures keep
    their saved steps instead of all falling back to a Dynamo re-trace (a prefill re-traced mid-run)."""
    traced = []

    class Saved:
        def guard_check(self, *args):
            return True

        def __call__(self, owner, x):
            return ("saved", x.shape[0])

    def capture(self, args):
        if args[0].shape[0] == 4:
            raise AssertionError("expected OutputCode, got <class 'function'>")
        return Saved()

    def dynamo(fn, backend):
        return lambda x: traced.append(x.shape[0]) or ("traced", x.shape[0])

    monkeypatch.setattr(step_cache.StepCache, "_capture", capture)
    monkeypatch.setattr(step_cache.StepCache, "_save", lambda self, sig, f, n: None)
    monkeypatch.setattr(step_cache, "compile_step", dynamo)
    monkeypatch.setattr(step_cache, "model_key", lambda owner, name: "model")
    monkeypatch.setattr(step_cache, "step_cache_root", lambda: tmp_path)

    def step(x):
        return x

    cache = step_cache.StepCache(step, None, SimpleNamespace(), ("x",))
    with caplog.at_level("WARNING"):
        got = [cache(torch.zeros(b, 2)) for b in (1, 4, 1, 8, 4)]
    assert got == [("saved", 1), ("traced", 4), ("saved", 1), ("saved", 8), ("traced", 4)]
    assert traced == [4, 4]
    assert "[4, 2]" in caplog.text and "not saved" in caplog.text


def speculative_cold_run(tmp_path, spec):
    """A first process with ``spec`` (empty step cache) and the tokens it must give; verifies ran."""
    data = {**recipe(tmp_path), "speculative": spec}
    cache = tmp_path / "steps"
    want = zycompile.optimize(None, {**data, "lowering": {"backend": "aot_eager"}}).generator()
    want = want.generate([PROMPT], max_new_tokens=6, ignore_eos=True).tokens
    cold = child(data, cache)
    assert cold["tokens"] == want and cold["verify"]["ran"]
    return data, cache, want, cold


@pytest.mark.inductor
def test_verify_and_eagle_head_graphs_are_saved_and_keyed_by_the_head_file(tmp_path):
    # a random head drafts every round (no confidence cut), so the verify graphs run too
    model = load_model("tiny:llama").model
    torch.manual_seed(0)
    head = EagleHead(model.config, type(model.model.layers[0]), torch.arange(0, 512, 2))
    path = tmp_path / "head.safetensors"
    save_head(head, path, {"target": "tiny:llama", "hidden_size": 64, "vocab_size": 512})
    spec = {"method": "eagle", "eagle_head": str(path), "num_tokens": 2}
    data, cache, want, cold = speculative_cold_run(tmp_path, spec)
    assert cold["draft"]["saved"] >= 2 and cold["draft"]["loaded"] == 0  # prefill entries + drafting
    assert cold["verify"]["saved"] >= 1 and cold["verify"]["loaded"] == 0
    assert cold["said"] and all(m.startswith("compiling ") for m in cold["said"])
    assert any(m.startswith("compiling verify graph") for m in cold["said"])
    warm = child(data, cache)
    assert warm["tokens"] == want and warm["traced"] == 0  # no graph traced, the head's included
    assert warm["draft"] == {"loaded": cold["draft"]["saved"], "saved": 0}
    assert warm["verify"]["loaded"] == cold["verify"]["saved"] >= 2 and warm["verify"]["saved"] == 0
    assert any(m.startswith("loading saved verify graph") for m in warm["said"])
    assert [m.replace("loading saved ", "compiling ") for m in warm["said"]] == cold["said"]
    assert warm["plans_used"] == cold["plans_used"] > 0  # tuned_gemm's plans came back and ran

    # another head with the same shapes is another key: its graphs are built, not the old ones loaded;
    # and a corrupt saved graph of the target is rebuilt, the others still loaded
    sorted(Path(cold["verify"]["dir"]).glob("*.bin"))[0].write_bytes(b"not a saved step")
    torch.manual_seed(1)
    save_head(
        EagleHead(model.config, type(model.model.layers[0]), torch.arange(0, 512, 2)),
        path,
        {"target": "tiny:llama", "hidden_size": 64, "vocab_size": 512},
    )
    other = child(data, cache)
    assert other["tokens"] == want
    assert other["draft"] == {"loaded": 0, "saved": cold["draft"]["saved"]}
    assert "ignoring unreadable saved step" in other["stderr"]
    assert other["verify"]["saved"] == 1 and other["verify"]["loaded"] == cold["verify"]["saved"] - 1
