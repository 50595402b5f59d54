"""small_gemm: small-M linears become a C++ kernel (panel_linear by default, small_linear with
``kernel: rows``) or fused per-row reductions; same tokens, prefill GEMMs untouched, a clear note when
the kernels cannot be built."""

from __future__ import annotations

import pytest
import torch

import zycompile
from zycompile.models import load_model

AOT = ["lowering.backend=aot_eager"]
PROMPTS = [[5, 17, 33, 2, 9], [7, 8], list(range(40, 75))]


def recipe(passes):
    return {
        "model": {"source": "tiny:llama"},
        "passes": passes,
        "lowering": {"backend": "aot_eager"},
        "runtime": {"max_seq_len": 96, "batch_buckets": [1, 4], "prefill_buckets": [8, 32]},
    }


def _optimize(passes):
    torch._dynamo.reset()
    return zycompile.optimize("tiny:llama", recipe(passes))


def test_decode_linears_rewritten_tokens_equal():
    base = ["canonicalize_attention", "fuse_projections"]
    want = _optimize(base).generate(PROMPTS, max_new_tokens=8, ignore_eos=True).tokens
    opt = _optimize([*base, {"name": "small_gemm", "max_m": 4}])
    out = opt.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    assert out.tokens == want
    one = opt.generate([PROMPTS[0]], max_new_tokens=8, ignore_eos=True)
    assert one.tokens[0] == want[0]
    # tiny llama: 2 layers x (fused qkv, o, fused gate/up, down) + the LM head = 9 small linears per
    # decode graph (batch 1 and 4); prefill graphs keep their symbolic-length GEMMs and rewrite only
    # the LM head, which runs on one gathered hidden state per row.
    per_graph = sorted(r.matches for r in opt.compile_report().passes if r.name == "small_gemm")
    assert per_graph[-2:] == [9, 9] and set(per_graph[:-2]) == {1}, per_graph


def test_logits_match_plain_linear():
    torch._dynamo.reset()
    model = load_model("tiny:llama").model
    ids = torch.tensor([[5, 17, 33, 2]])  # M = 4 rows in one forward
    with torch.no_grad():
        want = model(ids).logits
    opt = zycompile.optimize(model, {**recipe([{"name": "small_gemm", "max_m": 4}])}, overrides=AOT)
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert opt.compile_report().matches("small_gemm") > 0


@pytest.mark.parametrize("kernel", ["auto", "rows", "reduction"])
def test_k_major_weights_take_the_panel_kernel_else_are_left_alone_with_a_note(kernel):
    from zycompile.ops import cpu_kernels

    if kernel == "auto" and cpu_kernels.build() is not None:
        pytest.skip("C++ kernels unavailable")
    opt = _optimize(["weight_layout", {"name": "small_gemm", "max_m": 4, "kernel": kernel}])
    out = opt.generate([PROMPTS[0]], max_new_tokens=3, ignore_eos=True)
    report = opt.compile_report()
    notes = [n for r in report.passes if r.name == "small_gemm" for n in r.notes]
    if kernel == "auto":  # the panel copy is packed from any layout
        assert report.matches("small_gemm") > 0 and not any("not row-major" in n for n in notes), notes
        assert out.tokens == _optimize([]).generate([PROMPTS[0]], max_new_tokens=3, ignore_eos=True).tokens
    else:
        assert report.matches("small_gemm") == 0
        assert any("not row-major" in n for n in notes), notes


def _linear_graph(m=4, dtype=torch.float32):
    lin = torch.nn.Linear(64, 48).to(dtype)
    gm = torch.fx.symbolic_trace(lin)
    x = torch.randn(m, 64, dtype=dtype)
    for node in gm.graph.nodes:  # the pass reads shapes from node.meta["val"]
        if node.op == "placeholder":
            node.meta["val"] = x
        elif node.op == "get_attr":
            node.meta["val"] = getattr(lin, node.target)
        elif node.op == "call_function":
            node.meta["val"] = lin(x)
    return lin, gm, x


def _run_pass(gm, exporting=False, **opts):
    from zycompile.passes.base import PassContext
    from zycompile.passes.small_gemm import SmallGemmPass

    ctx = PassContext(zycompile.load_recipe(recipe([])), exporting=exporting)
    return SmallGemmPass(SmallGemmPass.Options(**opts), ctx)(gm)


def _targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_kernel_auto_calls_the_panel_kernel_rows_the_row_major_one_reduction_and_export_neither():
    from zycompile.ops import cpu_kernels

    if cpu_kernels.build() is not None:
        pytest.skip("C++ kernels unavailable")
    panel, rows = torch.ops.zycompile_cpu.panel_linear.default, torch.ops.zycompile_cpu.small_linear.default
    for opts, exporting, want in [
        ({}, False, panel),
        ({"kernel": "rows"}, False, rows),
        ({"kernel": "reduction"}, False, None),
        ({}, True, None),
    ]:
        lin, gm, x = _linear_graph()
        result = _run_pass(gm, exporting, **opts)
        kernels = _targets(gm) & {panel, rows}
        assert result.matches == 1 and kernels == ({want} if want else set()), (opts, exporting)
        copies = [n for n in result.notes if n.startswith("panel-packed weight copies")]
        assert bool(copies) == (want is panel), result.notes
        with torch.no_grad():
            torch.testing.assert_close(gm(x), lin(x), rtol=1e-5, atol=1e-5)


def test_unbuildable_kernel_falls_back_to_reductions_with_a_note(monkeypatch):
    from zycompile.ops import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "build", lambda: "Ninja is required to load C++ extensions")
    lin, gm, x = _linear_graph()
    result = _run_pass(gm)
    assert result.matches == 1 and torch.sum in _targets(gm)
    assert result.notes == [
        "C++ small-GEMM kernels unavailable (Ninja is required to load C++ extensions); "
        "using Inductor reductions"
    ]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,msg", [({"kernel": "fast"}, "kernel"), ({"max_m": 17}, "max_m")])
def test_bad_options_name_the_key(bad, msg):
    from zycompile.errors import RecipeError

    with pytest.raises(RecipeError, match=msg):
        zycompile.load_recipe(recipe([{"name": "small_gemm", **bad}]))


def test_weights_marked_for_half_copies_take_the_fp16_panel_kernel():
    """An owner (the EAGLE drafter) marks its weights' storage: their linears stream an fp16 copy
    (panel_linear_f16, fp32 math); unmarked weights keep the fp32 copy."""
    from zycompile.ops import cpu_kernels, half_linear

    if cpu_kernels.build() is not None:
        pytest.skip("C++ kernels unavailable")
    f16, f32 = torch.ops.zycompile_cpu.panel_linear_f16.default, torch.ops.zycompile_cpu.panel_linear.default
    lin, gm, x = _linear_graph()
    plain = _run_pass(gm)
    assert f32 in _targets(gm) and f16 not in _targets(gm)
    lin, gm, x = _linear_graph()
    assert half_linear.mark([lin.weight]) == 1
    half = _run_pass(gm)
    assert f16 in _targets(gm) and f32 not in _targets(gm)
    assert plain.matches == half.matches == 1
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, lin.weight.half().float(), lin.bias)
        torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)
    lin.weight.data = torch.randn(48, 64)  # another storage: the mark does not follow it
    assert not half_linear.wants_half(lin.weight)


def test_marked_weights_that_are_block_codes_keep_the_coded_copy():
    """A marked weight whose values are GGUF block codes (the EAGLE drafter's rows of a Q8_0 LM head)
    keeps panel_linear: its coded copy is smaller than fp16 and exact."""
    from gguf_codes import q8_0

    from zycompile.ops import cpu_kernels, half_linear

    if cpu_kernels.build() is not None or torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the coded kernels need the C++ kernels on an AVX-512 CPU")
    lin, gm, x = _linear_graph()
    with torch.no_grad():
        lin.weight.copy_(q8_0(48, 64))
    half_linear.mark([lin.weight])
    _run_pass(gm)
    assert torch.ops.zycompile_cpu.panel_linear.default in _targets(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), lin(x), rtol=1e-5, atol=1e-5)


def test_bf16_linears_take_the_panel_kernel_and_the_row_kernel_leaves_them_to_reductions():
    """A bf16 model's decode GEMMs stream a bf16 panel copy (half fp32's bytes); the row-major kernel is
    fp32 only, so with ``kernel: rows`` they get Inductor's reductions."""
    from zycompile.ops import cpu_kernels

    if cpu_kernels.build() is not None:
        pytest.skip("C++ kernels unavailable")
    panel = torch.ops.zycompile_cpu.panel_linear.default
    lin, gm, x = _linear_graph(dtype=torch.bfloat16)
    result = _run_pass(gm)
    assert result.matches == 1 and panel in _targets(gm)
    assert any("panel-packed weight copies: 0.0 MB" in n for n in result.notes)  # 64 x 64 x 2 bytes
    with torch.no_grad():
        want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
        torch.testing.assert_close(gm(x).float(), want, rtol=2**-7, atol=1e-3)
    lin, gm, x = _linear_graph(dtype=torch.bfloat16)
    assert _run_pass(gm, kernel="rows").matches == 1 and torch.sum in _targets(gm)
