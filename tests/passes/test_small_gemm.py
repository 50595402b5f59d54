"""small_gemm: small-M linears become fused per-row reductions; same tokens, prefill GEMMs untouched."""

from __future__ import annotations

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


def test_k_major_weights_are_left_alone_with_a_note():
    opt = _optimize(["weight_layout", {"name": "small_gemm", "max_m": 4}])
    opt.generate([PROMPTS[0]], max_new_tokens=3, ignore_eos=True)
    report = opt.compile_report()
    assert report.matches("small_gemm") == 0
    notes = [n for r in report.passes if r.name == "small_gemm" for n in r.notes]
    assert any("not row-major" in n for n in notes), notes
