"""overlap_comm: fuses TP+SP's all-gather→GEMM and GEMM→reduce-scatter pairs into ring ops (gloo ranks);
logits and greedy tokens equal one process with and without it; what it cannot fuse is left and noted."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import zycompile
from zycompile.backend import ZyBackend
from zycompile.models import load_model
from zycompile.ops import comm_stats
from zycompile.parallel.local_group import LocalGroup
from zycompile.recipe import load_recipe

SOURCE = "tiny:llama?num_key_value_heads=4"  # 2 layers; 4 KV heads so degree 4 divides them
LAYERS = 2
IDS = torch.tensor([[5, 17, 33, 2, 9, 11, 40, 41], list(range(100, 108))])  # batch 2: split+cat gathers
PROMPTS = [[5, 17, 33, 2, 9], [7, 8], list(range(40, 75))]  # buckets 8 and 32; 35 tokens take two chunks


def recipe(world: int, overlap: bool, **extra) -> dict:
    return {
        "model": {"source": SOURCE},
        "parallel": {"mode": "tp", "degree": world, "sequence_parallel": True}
        if world > 1
        else {"mode": "none"},
        "passes": ["canonicalize_attention", *(["overlap_comm"] if overlap else [])],
        "lowering": {"backend": "aot_eager"},
        "runtime": {"max_seq_len": 96, "batch_buckets": [1, 4], "prefill_buckets": [8, 32]},
        **extra,
    }


def sp_run(world: int, overlap: bool):
    """Logits of one forward (and the ring steps it sent), greedy tokens, overlap_comm's records."""
    torch._dynamo.reset()
    opt = zycompile.optimize(SOURCE, recipe(world, overlap))
    opt(IDS)  # compile first: count the steps of one run
    with torch.no_grad(), comm_stats.counting() as sent:
        logits = opt(IDS).logits
    tokens = opt.generate(PROMPTS, max_new_tokens=8, ignore_eos=True).tokens
    records = [(r.graph, r.matches, r.notes) for r in opt.compile_report().passes if r.name == "overlap_comm"]
    return logits, sent["calls"], tokens, records


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def group(request):
    with LocalGroup(request.param) as g:
        yield g


@pytest.fixture(scope="module")
def single():
    torch._dynamo.reset()
    logits = load_model(SOURCE).model(IDS).logits.detach()
    tokens = zycompile.optimize(SOURCE, recipe(1, False)).generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    return logits, tokens.tokens


@pytest.mark.full_world4
@pytest.mark.parametrize("overlap", [False, True], ids=["sp", "sp+overlap_comm"])
def test_tp_sequence_parallel_equals_one_process(group, single, overlap):
    want_logits, want_tokens = single
    world = group.world
    for logits, sent, tokens, records in group.run(sp_run, world, overlap):
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
        assert tokens == want_tokens
        if not overlap:
            assert sent == {} and records == []
            continue
        # per layer: one gather feeding q/k/v, one feeding gate/up; o_proj and down_proj reduce-scatter.
        # Left alone: the embedding's reduce-scatter (no GEMM), the final norm's gather (feeds the
        # row pick before the LM head) and the vocab-sharded head's logits gather.
        graph, matches, notes = records[0]  # the forward on IDS
        assert matches == 4 * LAYERS
        assert notes[0] == f"all gather matmul {2 * LAYERS}, matmul reduce scatter {2 * LAYERS}, left alone 3"
        assert any("also feeds" in n for n in notes[1:])
        assert sent == {"send": 4 * LAYERS * (world - 1)}  # each fused op: world-1 ring steps
        # prefill graphs match the same; the decode graph (1 token: plain TP, all-reduces) has nothing
        by_graph = {g: m for g, m, _ in records}
        assert sorted(by_graph.values()) == [0] + [4 * LAYERS] * (len(by_graph) - 1)


# ---- the options and patterns it must leave alone, on a small funcol graph ----------------------


def small(x, w1, w2, a, w3):
    group = dist.group.WORLD
    g = funcol.all_gather_single(x, 0, group)
    y = funcol.reduce_scatter_single(a @ w3, "sum", 0, group)
    return g @ w1, g[: g.shape[0]] @ w2, y  # a whole-tensor slice (DTensor emits them) is no obstacle


def feeds_other(x, w1):
    g = funcol.all_gather_single(x, 0, dist.group.WORLD)
    return g @ w1 + g.sum()


def small_graphs(options: dict):
    """(fused op count, matches, notes, max |compiled - eager|) for both functions on this rank."""
    torch.manual_seed(dist.get_rank())
    args = [torch.randn(4, 8), torch.randn(8, 6), torch.randn(8, 5), torch.randn(8, 3), torch.randn(3, 6)]
    out = []
    for fn, inputs in ((small, args), (feeds_other, args[:2])):
        torch._dynamo.reset()
        rec = load_recipe(
            {"passes": [{"name": "overlap_comm", **options}], "lowering": {"backend": "aot_eager"}}
        )
        backend = ZyBackend(rec)
        got, want = torch.compile(fn, backend=backend)(*inputs), fn(*inputs)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        err = max((g - w).abs().max().item() for g, w in zip(got, want))
        (record,) = backend.report.passes
        out.append((record.matches, record.notes, err))
    return out


OPTIONS = [  # options, matches in ``small``, the note that says why the rest was left
    ({}, 2, None),
    ({"all_gather_matmul": False}, 1, "all_gather_matmul disabled by the options"),
    ({"min_bytes": 1 << 20}, 0, "< min_bytes 1048576"),
]


def test_options_and_refusals():
    with LocalGroup(2) as g:
        for options, want_small, why in OPTIONS:
            for (matches, notes, err), (other, other_notes, other_err) in g.run(small_graphs, options):
                assert err < 1e-5 and other_err < 1e-5, options
                assert matches == want_small, (options, notes)
                assert why is None or any(why in n for n in notes), notes
                # a gather that also feeds a reduction is left as it was
                assert other == 0 and any("left alone" in n for n in other_notes[1:]), other_notes
                assert options or any("also feeds" in n for n in other_notes), other_notes


def test_graph_without_collectives_is_unchanged(tmp_path, caplog):
    torch._dynamo.reset()
    rec = recipe(1, True, debug={"dump_dir": str(tmp_path)})
    with caplog.at_level(logging.WARNING, logger="zycompile"):
        opt = zycompile.optimize(SOURCE, rec)
        opt(IDS)
    (record,) = [r for r in opt.compile_report().passes if r.name == "overlap_comm"]
    assert record.matches == 0
    assert "no all-gather or reduce-scatter in this graph" in record.notes
    assert "needs parallel: {mode: tp, sequence_parallel: true}" in caplog.text
    before = next(tmp_path.glob("*overlap_comm_before.txt")).read_text()
    assert next(tmp_path.glob("*overlap_comm_after.txt")).read_text() == before
    assert not opt.compile_report().warnings  # expected: nothing to match is not a failure here


def test_sequence_parallel_needs_tp():
    from zycompile.errors import RecipeError

    with pytest.raises(RecipeError, match="parallel.sequence_parallel.*applies to mode 'tp' only"):
        load_recipe({"parallel": {"sequence_parallel": True}})
