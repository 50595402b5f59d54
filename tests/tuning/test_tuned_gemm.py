"""tuned_gemm: timing and winner choice, the swap, parity with the untuned model, fallbacks and errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import zycompile
from zycompile.cli import main
from zycompile.errors import TuningDBError
from zycompile.models import load_model
from zycompile.ops import cpu_kernels, mkl_packed
from zycompile.recipe import load_recipe
from zycompile.runtime.compiled import compile_step
from zycompile.tuning import db as tdb
from zycompile.tuning.bench import BenchConfig, time_candidates
from zycompile.tuning.candidates import CANDIDATES, DEFAULT, Candidate, available
from zycompile.tuning.shapes import collect
from zycompile.tuning.tune import tune_shapes

# Behaviour, not timing quality: few buffer sets, and no waiting for a quiet machine (under xdist another
# worker always runs, and each round waited its full quiet_wait_s: the CLI test took 230-331 s, 30 alone).
FAST = BenchConfig(
    rotate_bytes=1 << 20, max_sets=4, budget_s=0.002, rounds=1, attempts=1, min_iters=2, quiet_wait_s=0.0
)
TINY = {
    "model": {"source": "tiny:llama"},
    "lowering": {"backend": "aot_eager"},
    "runtime": {"max_seq_len": 128, "batch_buckets": [1, 2], "prefill_buckets": [16]},
    "debug": {"strict": True},
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def recipe(db=None, passes=("canonicalize_attention", "weight_layout", "fuse_projections"), **rt):
    data = {**TINY, "passes": list(passes), "runtime": {**TINY["runtime"], **rt}}
    if db is not None:
        data["passes"].append({"name": "tuned_gemm", "db": str(db)})
    return load_recipe(data)


def forced_db(shapes, winner: str) -> tdb.TuningDB:
    """A database naming ``winner`` for every shape, as if it had won (parity must hold whatever wins)."""
    db = tdb.TuningDB(tdb.current_validators("cpu"))
    for s in shapes:
        db.entries[s] = tdb.Entry(winner, {DEFAULT: 2.0, winner: 1.0})
    return db


def test_candidates_time_and_a_wrong_one_is_discarded():
    shape = collect(recipe(), load_model("tiny:llama").model)[5]
    wrong = Candidate("wrong", lambda w, m: w, lambda x, w, b: torch.nn.functional.linear(x, w, b) + 1, False)
    cands = available(torch.device("cpu"), torch.float32)
    names = {c.name for c in cands}
    assert cands[0].name == DEFAULT and {"onednn", "onednn_packed", "inductor_cpp"} <= names
    assert ("mkl_packed" in names) == (mkl_packed.build() is None)
    assert ("split_n" in names) == (torch.get_num_threads() > 1)
    assert ("small_linear" in names) == ("panel_linear" in names) == (cpu_kernels.build() is None)
    cands = [c for c in cands if c.name != "inductor_cpp"]  # compiled and checked in its own test below
    timings = time_candidates(shape, [*cands, wrong], FAST)
    assert [t.candidate for t in timings] == [c.name for c in cands] + ["wrong"]
    assert all(t.ms is not None and t.ms > 0 for t in timings[:-1])
    assert timings[-1].ms is None and "differs from the default" in timings[-1].error


def test_candidates_are_timed_the_way_the_compiled_graph_calls_them(monkeypatch):
    """The default and the small-GEMM kernels run as direct ops; every other CPU candidate through the
    ``tuned_linear`` op tuned_gemm swaps in (its dispatch is part of the cost), with a plan of its
    own per candidate that is dropped afterwards."""
    from zycompile.ops import tuned_linear as tl
    from zycompile.tuning import bench

    shape = collect(recipe(), load_model("tiny:llama").model)[5]
    through_op: list[str] = []
    real = tl.tuned_linear

    def spy(x, w, b, pid):
        through_op.append(tl.PLANS[pid].pick(x.shape[0]))
        return real(x, w, b, pid)

    monkeypatch.setattr(tl, "tuned_linear", spy)
    plans_before = set(tl.PLANS)
    packed = ["mkl_packed"] if mkl_packed.build() is None else []
    kernels = ["small_linear", "panel_linear"] if cpu_kernels.build() is None else []
    names = [DEFAULT, *packed, "onednn", *kernels]
    timings = time_candidates(shape, [CANDIDATES[n] for n in names], FAST)
    assert all(t.ms is not None for t in timings)
    assert set(through_op) == {*packed, "onednn"}  # each candidate ran in its own plan
    assert set(tl.PLANS) == plans_before and not bench._TIMING_PLANS


def test_default_kept_unless_a_candidate_clears_the_margin():
    shapes = collect(recipe(), load_model("tiny:llama").model)[:3]
    db = tdb.TuningDB(tdb.current_validators("cpu"), margin=1e9)
    rows = tune_shapes(shapes, db, FAST)
    assert all(r.winner == DEFAULT and r.speedup == 1.0 for r in rows)
    assert all(db.lookup(s).winner == DEFAULT and len(db.lookup(s).times_ms) >= 4 for s in shapes)
    # opt-in candidates are timed only when included
    assert all("inductor_cpp" not in db.lookup(s).times_ms for s in shapes)


def test_tuning_saves_after_each_shape(tmp_path):
    """A run killed part way (the OOM killer, Ctrl-C) keeps the shapes it measured; --new-only resumes."""
    shapes = collect(recipe(), load_model("tiny:llama").model)[:2]
    db = tdb.TuningDB(tdb.current_validators("cpu"))
    path = tmp_path / "db.yaml"
    held = []

    def save():
        db.save(path)
        held.append(sum(tdb.TuningDB.load(path).lookup(s) is not None for s in shapes))

    tune_shapes(shapes, db, FAST, save=save)
    assert held == [1, 2]


@pytest.mark.parametrize(
    "winner", ["onednn_packed", "mkl_packed", "onednn", "aten_relayout", "inductor_cpp", "split_n"]
)
def test_swapped_model_matches_untuned_logits(tmp_path, winner):
    if not CANDIDATES[winner].available(torch.device("cpu"), torch.float32):
        pytest.skip(f"{winner} is unavailable here")
    model = load_model("tiny:llama").model
    ref_model = load_model("tiny:llama").model
    shapes = collect(recipe(), model)
    path = forced_db(shapes, winner).save(tmp_path / "db.yaml")
    opt = zycompile.optimize(model, recipe(path))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref_model(input_ids=ids, use_cache=False).logits
        got = opt(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    rec = next(r for r in opt.compile_report().passes if r.name == "tuned_gemm")
    # 2 layers x (qkv, o, gate/up, down) at M = 2 x 16 = 32 are in the db; the full-sequence head is not
    assert rec.matches == 8
    assert "swapped 8" in rec.notes[0] and "not in db 1" in rec.notes[0]
    assert f"{winner} x8" in rec.notes[1]
    if CANDIDATES[winner].copies_weight:
        assert "extra weight memory" in rec.notes[2]


@pytest.mark.parametrize(
    # inductor_cpp's swap is checked by test_swapped_model_matches_untuned_logits; this adds ~40 s of compiles
    "winner",
    ["onednn_packed", pytest.param("inductor_cpp", marks=pytest.mark.full)],
)
def test_generation_is_token_identical_with_static_and_dynamic_prefill(tmp_path, winner):
    # inductor_cpp is compiled for one M: the symbolic-M prefill graph keeps the default there
    prompts = [[1, 5, 9, 13, 2, 7, 3], [4, 4, 8]]
    base = zycompile.optimize(load_model("tiny:llama").model, recipe())
    want = base.generate(prompts, max_new_tokens=6).tokens
    for prefill in ("buckets", "dynamic"):
        torch._dynamo.reset()
        model = load_model("tiny:llama").model
        shapes = collect(recipe(prefill=prefill), model)
        path = forced_db(shapes, winner).save(tmp_path / f"{prefill}.yaml")
        opt = zycompile.optimize(model, recipe(path, prefill=prefill))
        assert opt.generate(prompts, max_new_tokens=6).tokens == want
        swapped = [r.matches for r in opt.compile_report().passes if r.name == "tuned_gemm"]
        if winner == "inductor_cpp" and prefill == "dynamic":
            # a symbolic-M prefill graph skips one-M kernels (only its head, at static M = rows, is
            # swapped); the static decode graphs use them
            assert swapped[0] == 1 and sum(swapped) >= 1 + 9
        else:
            assert sum(swapped) >= 9 * 2  # prefill and decode graphs, every GEMM incl. the head


def test_auto_without_database_keeps_every_default(tmp_path, monkeypatch):
    monkeypatch.setenv("ZYCOMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(tdb, "SHIPPED_DIR", tmp_path / "shipped")  # none shipped for this device
    opt = zycompile.optimize(load_model("tiny:llama").model, recipe("auto"))
    with torch.no_grad():
        opt(input_ids=torch.ones(1, 16, dtype=torch.long), use_cache=False)
    rec = next(r for r in opt.compile_report().passes if r.name == "tuned_gemm")
    assert rec.matches == 0
    assert "no tuning database" in " ".join(rec.notes) and "not in db 9" in rec.notes[0]


def test_auto_finds_the_device_database(tmp_path, monkeypatch):
    monkeypatch.setenv("ZYCOMPILE_CACHE", str(tmp_path))
    model = load_model("tiny:llama").model
    forced_db(collect(recipe(), model), "onednn").save(tdb.default_path("cpu"))
    opt = zycompile.optimize(model, recipe("auto"))
    with torch.no_grad():
        opt(input_ids=torch.ones(1, 16, dtype=torch.long), use_cache=False)
    assert opt.compile_report().matches("tuned_gemm") == 8


def test_auto_falls_back_to_the_shipped_database(tmp_path, monkeypatch):
    monkeypatch.setenv("ZYCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tdb, "SHIPPED_DIR", tmp_path / "shipped")
    model = load_model("tiny:llama").model
    path = forced_db(collect(recipe(), model), "onednn").save(tdb.shipped_path("cpu"))
    opt = zycompile.optimize(model, recipe("auto"))
    with torch.no_grad():
        opt(input_ids=torch.ones(1, 16, dtype=torch.long), use_cache=False)
    rec = next(r for r in opt.compile_report().passes if r.name == "tuned_gemm")
    assert rec.matches == 8 and f"database: {path}" in rec.notes


def test_auto_skips_a_shipped_database_of_other_software(tmp_path, monkeypatch):
    # Shipped for this CPU but another torch: not the user's file, so skipped (no error), defaults kept.
    monkeypatch.setenv("ZYCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tdb, "SHIPPED_DIR", tmp_path / "shipped")
    model = load_model("tiny:llama").model
    db = forced_db(collect(recipe(), model), "onednn")
    db.validators["torch"] = "0.0.1"
    db.save(tdb.shipped_path("cpu"))
    opt = zycompile.optimize(model, recipe("auto"))
    with torch.no_grad():
        opt(input_ids=torch.ones(1, 16, dtype=torch.long), use_cache=False)
    rec = next(r for r in opt.compile_report().passes if r.name == "tuned_gemm")
    assert rec.matches == 0 and "no tuning database" in " ".join(rec.notes)


def test_collection_skips_gemms_below_min_m():
    model = load_model("tiny:llama").model
    passes = ("canonicalize_attention", "fuse_projections", {"name": "tuned_gemm", "min_m": 2})
    ms = {s.m for s in collect(recipe(passes=passes), model)}
    assert 1 not in ms and {2, 16, 32} <= ms


def test_foreign_database_is_rejected_before_tracing(tmp_path):
    db = forced_db([], "onednn")
    db.validators["device"] = "cuda: NVIDIA H100"
    path = db.save(tmp_path / "db.yaml")
    with pytest.raises(TuningDBError, match="rejected.*device.*NVIDIA H100"):
        zycompile.optimize(load_model("tiny:llama").model, recipe(path))


def test_unknown_winner_falls_back_to_default(tmp_path):
    """A TunableOp solution (e.g. hipBLASLt) or a candidate this build lacks is never run on CPU."""
    model = load_model("tiny:llama").model
    path = forced_db(collect(recipe(), model), "Gemm_Hipblaslt_1219").save(tmp_path / "db.yaml")
    opt = zycompile.optimize(model, recipe(path))
    with torch.no_grad():
        opt(input_ids=torch.ones(1, 16, dtype=torch.long), use_cache=False)
    rec = next(r for r in opt.compile_report().passes if r.name == "tuned_gemm")
    assert rec.matches == 0 and "default fastest 8" in rec.notes[0]


def test_bad_options_are_recipe_errors():
    from zycompile.errors import RecipeError

    with pytest.raises(RecipeError, match="min_speedup"):
        load_recipe({**TINY, "passes": [{"name": "tuned_gemm", "min_speedup": 0.5}]})


def test_cli_tune_writes_a_database_and_a_table(tmp_path, capsys, monkeypatch):
    import zycompile.tuning.tune as tune_mod

    monkeypatch.setattr(tune_mod, "DEFAULT_BENCH", dataclasses.replace(FAST))
    out = tmp_path / "tiny.yaml"
    args = ["tune", "--recipe", "llama-tiny", "--out", str(out), "--set", "lowering.backend=aot_eager"]
    assert main([*args, "--skip", "fastest"]) == 2
    assert "--skip fastest: no such candidate; candidates: aten_relayout" in capsys.readouterr().err
    assert main([*args, "--include", "split_n"]) == 2
    assert "--include split_n: it is timed anyway; opt-in candidates: inductor_cpp" in capsys.readouterr().err
    assert main(args) == 0  # inductor_cpp (opt-in) is not timed: minutes of compiles on the tiny model here
    text = capsys.readouterr()
    assert "geometric-mean speedup" in text.out and "| 4 x 128 x 64 float32 row |" in text.out
    assert "35/35" in text.err
    entries = tdb.load_checked(out).entries
    assert len(entries) == 35 and all("inductor_cpp" not in e.times_ms for e in entries.values())
    assert main([*args, "--m", "3", "--new-only"]) == 0  # a verify width: only its shapes are timed
    text = capsys.readouterr()
    assert "35 shape(s) already in" in text.err and "| 3 x 128 x 64 float32 row |" in text.out
    added = set(tdb.load_checked(out).entries) - set(entries)
    assert added and {s.m for s in added} == {3} and "| 4 x 128 x 64" not in text.out
    assert main([*args, "--m", "0"]) == 2 and "--m 0: expected row counts >= 1" in capsys.readouterr().err
    assert main(args) == 0  # updates the same file
    other = tdb.TuningDB.load(out)
    other.validators["torch"] = "0.0"
    other.save(out)
    assert main(args) == 2
    assert "rejected" in capsys.readouterr().err


def test_weight_copies_false_picks_the_fastest_single_copy_candidate(tmp_path):
    model = load_model("tiny:llama").model
    db = tdb.TuningDB(tdb.current_validators("cpu"))
    for s in collect(recipe(), model):
        db.entries[s] = tdb.Entry("onednn_packed", {DEFAULT: 2.0, "onednn_packed": 1.0, "onednn": 1.5})
    path = db.save(tmp_path / "db.yaml")
    rec = recipe(path)
    data = rec.to_dict()
    data["passes"][-1]["weight_copies"] = False
    opt = zycompile.optimize(model, load_recipe(data))
    with torch.no_grad():
        opt(input_ids=torch.ones(1, 16, dtype=torch.long), use_cache=False)
    notes = next(r for r in opt.compile_report().passes if r.name == "tuned_gemm").notes
    assert "candidates: onednn x8" in notes and not any("extra weight memory" in n for n in notes)


def test_min_m_leaves_gemvs_to_the_default(tmp_path):
    model = load_model("tiny:llama").model
    path = forced_db(collect(recipe(), model), "onednn_packed").save(tmp_path / "db.yaml")
    data = recipe(path).to_dict()
    data["passes"][-1]["min_m"] = 2
    opt = zycompile.optimize(model, load_recipe(data))
    opt.generate([[1, 2, 3]], max_new_tokens=3)  # batch 1: prefill M = 16 swapped, M = 1 not
    recs = [r for r in opt.compile_report().passes if r.name == "tuned_gemm"]
    assert [r.matches for r in recs] == [8, 0]  # the prefill graph's head runs at M = 1 (last token)
    assert "below min m 1" in recs[0].notes[0] and "below min m 9" in recs[1].notes[0]


def test_inductor_cpp_is_exact_m_and_split_n_keeps_one_copy():
    threads = torch.get_num_threads()
    w, b = torch.randn(96, 64), torch.randn(96)
    cpp, split = CANDIDATES["inductor_cpp"], CANDIDATES["split_n"]
    state = cpp.prepare(w, 4)
    for m in (4, 3):  # its own M runs the compiled template; another M falls back to F.linear
        x = torch.randn(m, 64)
        torch.testing.assert_close(cpp.run(x, state, b), torch.nn.functional.linear(x, w, b))
    blocks = split.prepare(w, 8)
    assert all(blk.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for _, _, blk in blocks)
    assert [(lo, hi) for lo, hi, _ in blocks][-1][1] == 96
    x = torch.randn(8, 64)
    torch.testing.assert_close(split.run(x, blocks, b), torch.nn.functional.linear(x, w, b))
    assert torch.get_num_threads() == threads  # the single-threaded workers left ours alone


def test_inductor_cpp_prepares_inside_a_step_capture():
    """The step cache captures graphs with ``aot_compile``, which bundles AOTAutograd cache entries; the
    tuned_gemm pass prepares inductor_cpp kernels during that capture. The template's frozen graph is
    not bundleable, so it must compile outside that mode (it failed every batch-4/8 decode capture)."""
    import torch._functorch.config as functorch_config

    from zycompile.tuning.candidates import _CAPTURE_AUTOGRAD_CACHE

    capture = {k: True for k in _CAPTURE_AUTOGRAD_CACHE if hasattr(functorch_config, k)}
    if "bundled_autograd_cache" not in capture:
        pytest.skip("no bundled AOTAutograd cache in this torch")
    w = torch.randn(96, 64)
    with functorch_config.patch(capture):
        state = CANDIDATES["inductor_cpp"].prepare(w, 4)
    x = torch.randn(4, 64)
    torch.testing.assert_close(
        CANDIDATES["inductor_cpp"].run(x, state, None), torch.nn.functional.linear(x, w)
    )


def test_plan_outlives_the_graphs_view_of_its_weight():
    """fuse_projections hands each graph a fresh view of the fused storage. The plan (its id in the graph,
    its prepacked copies) must outlive that view: a re-trace (torch._dynamo.reset(), a warm start) then
    builds the same graph, which Inductor's cache can hit, without re-packing. A new storage, even at a
    reused address, gets a new plan."""
    import gc

    from zycompile.ops.tuned_linear import PLANS, plan_for

    packed = CANDIDATES["onednn_packed"]
    if not packed.available(torch.device("cpu"), torch.float32):
        pytest.skip("oneDNN packed GEMM not in this build")
    w = torch.randn(96, 32)

    def view(t):  # what fuse_projections' storage_view gives each graph: a new tensor object
        return t.new_empty(0).set_(t.untyped_storage(), 0, (64, 32), (32, 1))

    first = view(w)
    pid = plan_for(first)
    PLANS[pid].state(packed, first, 4)
    del first
    gc.collect()
    assert plan_for(view(w)) == pid and PLANS[pid].states  # same id, prepacked copy kept
    assert plan_for(w[:64]) == pid  # any view with the same geometry
    del w
    gc.collect()
    assert not PLANS[pid].states  # freed with the storage
    assert plan_for(view(torch.randn(96, 32))) != pid


def test_retrace_gives_the_same_plan_ids(tmp_path, monkeypatch):
    import gc

    from zycompile.passes.tuned_gemm import TunedGemmPass

    seen: list[int] = []
    swap = TunedGemmPass._swap
    monkeypatch.setattr(
        TunedGemmPass, "_swap", staticmethod(lambda gm, n, pid: (seen.append(pid), swap(gm, n, pid)))
    )
    model = load_model("tiny:llama").model
    path = forced_db(collect(recipe(prefill="dynamic"), model), "onednn_packed").save(tmp_path / "db.yaml")
    opt = zycompile.optimize(model, recipe(path, prefill="dynamic"))
    gen = opt.generator()
    want = gen.generate([[1, 5, 9, 13, 2]], max_new_tokens=4).tokens
    first, seen[:] = list(seen), []
    torch._dynamo.reset()
    gc.collect()  # the first graphs (and their views of the fused weights) are gone
    gen.compiled_step = compile_step(gen._step, opt.backend)
    gen.seen_shapes.clear()
    assert gen.generate([[1, 5, 9, 13, 2]], max_new_tokens=4).tokens == want
    assert first and seen == first


def test_an_untuned_m_borrows_the_nearest_tuned_m_any_m_winner(tmp_path):
    # A verify width (M = 3 here) no bucket runs: the nearest tuned M within 2x (M = 2) lends its fastest
    # candidate that serves any M; its one-M kernel (inductor_cpp, the winner) cannot run at M = 3.
    model = load_model("tiny:llama").model
    ref_model = load_model("tiny:llama").model
    shapes = [s for s in collect(recipe(), model) if s.m == 2]
    db = forced_db(shapes, "inductor_cpp")
    for s in shapes:
        db.entries[s].times_ms["onednn_packed"] = 1.5
    path = db.save(tmp_path / "db.yaml")
    for m, swapped in ((3, 9), (5, 0)):  # M = 5 is 2.5x the nearest tuned M: left alone
        torch._dynamo.reset()
        opt = zycompile.optimize(model, recipe(path))
        ids = torch.randint(0, 512, (m, 1), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(
                opt(input_ids=ids, use_cache=False).logits,
                ref_model(input_ids=ids, use_cache=False).logits,
                rtol=1e-4,
                atol=1e-4,
            )
        rec = next(r for r in opt.compile_report().passes if r.name == "tuned_gemm")
        assert rec.matches == swapped
        if swapped:
            assert "onednn_packed x9" in rec.notes[1]
            assert any("nearest tuned M" in n and f"M={m} " in n and "from M=2" in n for n in rec.notes)
        else:
            assert "not in db 9" in rec.notes[0]


@pytest.mark.skipif(cpu_kernels.build() is not None, reason="C++ kernels unavailable")
@pytest.mark.parametrize("winner", ["small_linear", "panel_linear"])
def test_small_gemm_kernel_winners_are_left_to_small_gemm_and_tokens_stay_the_same(tmp_path, winner):
    prompts = [[1, 5, 9, 13, 2, 7, 3], [4, 4, 8]]
    base = ["canonicalize_attention", "fuse_projections"]
    want = zycompile.optimize(load_model("tiny:llama").model, recipe(passes=base)).generate(
        prompts, max_new_tokens=5
    )
    model = load_model("tiny:llama").model
    path = forced_db(collect(recipe(passes=base), model), winner).save(tmp_path / "db.yaml")
    passes = [*base, {"name": "tuned_gemm", "db": str(path)}, "small_gemm"]
    opt = zycompile.optimize(model, load_recipe({**TINY, "passes": passes}))
    assert opt.generate(prompts, max_new_tokens=5).tokens == want.tokens
    records = opt.compile_report().passes
    tuned = [r for r in records if r.name == "tuned_gemm"]
    small = [r for r in records if r.name == "small_gemm"]
    # decode graphs (M = 1, 2; 9 linears): a small-GEMM kernel won, so small_gemm writes its kernel call
    # instead of tuned_gemm's dispatch op; prefill GEMMs (M >= 16) are swapped as usual
    decode = [t for t, sm in zip(tuned, small) if sm.matches == 9]
    assert decode and all(t.matches == 0 and "left to small gemm 9" in t.notes[0] for t in decode)
    assert any(t.matches > 0 for t in tuned)
    notes = [n for t in tuned for n in t.notes]
    # the panel kernel's copy is the op's own, shared with small_gemm's: reported apart from the others
    assert any(n.startswith("panel-packed weight copies") for n in notes) == (winner == "panel_linear")
    assert not any(n.startswith("extra weight memory") for n in notes), notes


def test_a_dynamic_m_packs_once_and_skips_per_m_candidates():
    """A symbolic-M (prefill) graph may use mkl_packed (one packed copy serves every M) but never a
    candidate built per M (inductor_cpp): each prompt length would build it again; nor split_n, whose
    worker threads lost to the runner-up inside the prefill graph."""
    from zycompile.ops.tuned_linear import PLANS, plan_for, tuned_linear
    from zycompile.passes.base import PassContext
    from zycompile.passes.tuned_gemm import TunedGemmPass

    tuned = TunedGemmPass(TunedGemmPass.Options(), PassContext(recipe()))
    entry = tdb.Entry("inductor_cpp", {DEFAULT: 3.0, "inductor_cpp": 1.0, "onednn_packed": 1.5})
    assert tuned._choose(entry, 1.03, torch.float32, dynamic=False) == "inductor_cpp"  # static M: built once
    assert tuned._choose(entry, 1.03, torch.float32, dynamic=True) == "onednn_packed"  # any-M instead
    if mkl_packed.build() is not None:
        pytest.skip(f"mkl_packed: {mkl_packed.build()}")
    entry = tdb.Entry("mkl_packed", {DEFAULT: 3.0, "mkl_packed": 1.0, "onednn_packed": 1.5})
    assert tuned._choose(entry, 1.03, torch.float32, dynamic=True) == "mkl_packed"
    entry = tdb.Entry("split_n", {DEFAULT: 3.0, "split_n": 0.9, "mkl_packed": 1.0})
    if torch.get_num_threads() > 1:  # split_n needs two intra-op threads
        assert tuned._choose(entry, 1.03, torch.float32, dynamic=False) == "split_n"
    assert tuned._choose(entry, 1.03, torch.float32, dynamic=True) == "mkl_packed"  # no worker threads

    w = torch.randn(48, 32)
    pid = plan_for(w)
    PLANS[pid].table.update({16: "mkl_packed"})
    for m in (16, 20, 23, 300):  # every prompt length runs the one packed copy
        x = torch.randn(m, 32)
        torch.testing.assert_close(tuned_linear(x, w, None, pid), torch.nn.functional.linear(x, w))
    assert sorted(k for k in PLANS[pid].states) == [("mkl_packed", 0)]
