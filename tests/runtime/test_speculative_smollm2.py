"""Speculative decoding on the real default model: greedy identity on ShareGPT prompts, the committed
EAGLE head really drafts, and ``zycompile train-draft`` writes a head the runtime loads.

A few prompts here; ``bench/speculative.py`` asserts the identity on 50 prompts x 64 tokens."""

from __future__ import annotations

import pytest
import torch

import zycompile
from zycompile.cli import main
from zycompile.data import sample_sharegpt
from zycompile.models import load_model
from zycompile.runtime.eagle import load_head

pytestmark = pytest.mark.slow
# eager lowering, as tests/runtime/test_speculative.py (test_smollm2.py keeps aot_eager for the real model)
FAST = ["lowering.backend=eager", "runtime.max_seq_len=384", "runtime.prefill_buckets=[256]"]
N_NEW = 24


@pytest.fixture(scope="module")
def prompts_and_reference():
    """Plain greedy tokens from HF's own generate, which test_smollm2.py shows equal to zycompile's
    plain decoding on these prompts (32 tokens): no compile of the plain model here."""
    opt = zycompile.optimize(None, "smollm2-135m", overrides=FAST)
    gen = opt.generator()  # for the chat template only: nothing is compiled until it generates
    prompts = [gen.encode(r.prompt)[0] for r in sample_sharegpt(opt.tokenizer, 3, seed=0, max_prompt_len=200)]
    hf = load_model("smollm2-135m-instruct").model
    with torch.no_grad():
        outs = [
            hf.generate(torch.tensor([p]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
            for p in prompts
        ]
    return prompts, [o[0, len(p) :].tolist() for o, p in zip(outs, prompts)]


@pytest.mark.parametrize(
    "recipe, extra",
    [
        # n-gram identity is the tiny models' test (test_speculative.py) and bench/speculative.py's
        pytest.param("smollm2-135m", ["speculative.method=ngram"], id="ngram", marks=pytest.mark.full),
        pytest.param("smollm2-135m-eagle", [], id="eagle"),
    ],
)
def test_greedy_identical_on_sharegpt(recipe, extra, prompts_and_reference):
    prompts, ref = prompts_and_reference
    torch._dynamo.reset()
    opt = zycompile.optimize(None, recipe, overrides=FAST + extra)
    outs = [opt.generate([p], max_new_tokens=N_NEW, ignore_eos=True) for p in prompts]
    assert [o.tokens[0] for o in outs] == ref
    if recipe.endswith("eagle"):  # a trained head, not noise: a good share of its drafts is accepted
        accepted = sum(o.speculative["accepted"] for o in outs) / sum(o.speculative["drafted"] for o in outs)
        assert accepted > 0.1  # a random head: ~0


def test_train_draft_writes_a_loadable_head(tmp_path, capsys):
    """Two epochs over one row's cached target features; a second run reuses the saved features."""
    out, feats = tmp_path / "head.safetensors", tmp_path / "feats.pt"
    argv = ["train-draft", "--out", str(out), "--steps", "2", "--batch", "1", "--rows", "1"]
    argv += ["--seq-len", "32", "--val-rows", "1", "--draft-vocab", "256", "--features", str(feats)]
    assert main(argv + ["--dtype", "float32"]) == 0
    assert feats.is_file() and "reusing target features" not in capsys.readouterr().err
    model = load_model("smollm2-135m-instruct").model
    head, meta = load_head(out, model, torch.float32)
    assert len(head.vocab_ids) == 256 and meta["steps"] == 2 and meta["epochs"] == 2.0
    assert meta["tokens"] == 32 and meta["target"] == "smollm2-135m-instruct"
    assert "train-draft" in meta["command"] and 0 <= meta["val_top1"] <= 1
    assert main(argv + ["--dtype", "float32"]) == 0
    assert "reusing target features" in capsys.readouterr().err
    # refine it with the training-time test: same vocabulary, the provenance of both runs kept
    refined = tmp_path / "refined.safetensors"
    argv2 = [*argv, "--out", str(refined), "--init", str(out), "--unroll", "2", "--dtype", "float32"]
    assert main(argv2) == 0
    assert "depth 2" in capsys.readouterr().err
    head2, meta2 = load_head(refined, model, torch.float32)
    assert torch.equal(head2.vocab_ids, head.vocab_ids) and meta2["unroll"] == 2
    assert meta2["init_command"] == meta["command"] and len(meta2["val_top1_depths"]) == 2
