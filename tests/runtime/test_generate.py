"""Static-cache generation: parity with HF generate, batching, no decode recompiles, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import zycompile
from zycompile.errors import GenerationError
from zycompile.models import load_model

FAST = ["lowering.backend=aot_eager", "runtime.prefill_buckets=[8, 32]", "runtime.max_seq_len=96"]
PROMPTS = [[5, 17, 33, 2, 9], [7, 8], list(range(40, 75)), [100, 101, 102]]


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ["tiny:llama", "tiny:qwen3"])
def test_greedy_matches_hf_generate(arch):
    ref_model = load_model(arch).model
    opt = zycompile.optimize(load_model(arch).model, "llama-tiny", overrides=FAST)
    for p in PROMPTS:
        got = opt.generate([p], max_new_tokens=16, ignore_eos=True).tokens[0]
        assert got == _hf_greedy(ref_model, p, 16)


def test_batch_of_different_lengths_equals_alone():
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=FAST)
    batch = opt.generate(PROMPTS, max_new_tokens=12, ignore_eos=True).tokens
    alone = [opt.generate([p], max_new_tokens=12, ignore_eos=True).tokens[0] for p in PROMPTS]
    assert batch == alone


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_tensor_input(side):
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=FAST)
    width = max(len(p) for p in PROMPTS)
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, sl], mask[i, sl] = torch.tensor(p), 1
    got = opt.generate(ids, attention_mask=mask, max_new_tokens=8, ignore_eos=True).tokens
    assert got == opt.generate(PROMPTS, max_new_tokens=8, ignore_eos=True).tokens


def test_decode_compiles_once_and_never_recompiles():
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=FAST)
    opt.generate([PROMPTS[0]], max_new_tokens=4, ignore_eos=True)  # prefill bucket 8 + decode (batch 1)
    graphs = counters["stats"]["unique_graphs"]
    compiled = len(opt.compile_report().graphs)
    for p in ([1, 2, 3], [9] * 7, [4, 5]):  # same prefill bucket, different lengths and positions
        opt.generate([p], max_new_tokens=20, ignore_eos=True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(opt.compile_report().graphs) == compiled


def test_long_prompt_is_prefilled_in_chunks():
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=FAST)
    ref_model = load_model("tiny:llama").model
    prompt = [(i * 7) % 500 for i in range(70)]  # > largest prefill bucket (32): three chunks
    assert opt.generate([prompt], max_new_tokens=8, ignore_eos=True).tokens[0] == _hf_greedy(
        ref_model, prompt, 8
    )


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=FAST)
    p = PROMPTS[0]
    a = opt.generate([p], max_new_tokens=10, temperature=1.0, seed=3, ignore_eos=True).tokens
    b = opt.generate([p], max_new_tokens=10, temperature=1.0, seed=3, ignore_eos=True).tokens
    assert a == b
    greedy = opt.generate([p], max_new_tokens=10, ignore_eos=True).tokens
    assert opt.generate([p], max_new_tokens=10, temperature=0.7, top_k=1, ignore_eos=True).tokens == greedy


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompts": [[]]}, "empty"),
        ({"prompts": [list(range(90))], "max_new_tokens": 10}, "max_seq_len is 96"),
        ({"prompts": "hello"}, "no tokenizer"),
        ({"prompts": [[1, 2]], "temperature": -1.0}, "temperature"),
        ({"prompts": [[1, 2]], "top_p": 0.0}, "top_p"),
        ({"prompts": [[1, 2]], "max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_inputs_give_clear_errors(kwargs, match):
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=FAST)
    prompts = kwargs.pop("prompts")
    with pytest.raises(GenerationError, match=match):
        opt.generate(prompts, **kwargs)


def test_unknown_model_and_missing_path_are_clear():
    with pytest.raises(zycompile.ModelLoadError, match="no-such-model"):
        zycompile.optimize("no-such-model", "llama-tiny")
    with pytest.raises(zycompile.ModelLoadError, match="/does/not/exist"):
        zycompile.optimize("/does/not/exist", "llama-tiny")


def test_dynamic_prefill_is_one_graph_for_all_lengths():
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=[*FAST, "runtime.prefill=dynamic"])
    ref_model = load_model("tiny:llama").model
    for n in (5, 9, 17, 40):  # 40 > largest bucket (32): two chunks of different lengths
        p = [(i * 13) % 500 for i in range(n)]
        assert opt.generate([p], max_new_tokens=6, ignore_eos=True).tokens[0] == _hf_greedy(ref_model, p, 6)
    assert len(opt.compile_report().graphs) == 2  # one prefill graph (symbolic length) + one decode graph
