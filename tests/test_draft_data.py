"""``train-draft --replies``: the target's own greedy replies, generated with the compiled runtime and
packed into training rows."""

from __future__ import annotations

import json

import pytest

import zycompile
from zycompile import draft_data
from zycompile.errors import ZyError

PROMPTS = [[5, 17, 33, 2, 9], [7, 8], list(range(40, 60))]
FAST = ["lowering.backend=aot_eager", "runtime.max_seq_len=64", "runtime.prefill_buckets=[8, 32]"]


def test_generated_replies_are_the_targets_greedy_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr(draft_data, "training_prompts", lambda encode, count, seed, max_len: PROMPTS[:count])
    recipe = zycompile.load_recipe("llama-tiny", FAST)
    path = tmp_path / "replies.jsonl"
    draft_data.generate_replies(recipe, path, 3, max_new_tokens=6, batch=2, seed=0, log=lambda m: None)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    got = {tuple(r["prompt"]): r["output"] for r in lines}
    want = zycompile.optimize(None, recipe).generate(PROMPTS, max_new_tokens=6).tokens
    assert got == {tuple(p): w for p, w in zip(PROMPTS, want)}


def test_the_generating_model_is_released_when_the_replies_are_written(tmp_path, monkeypatch):
    """train-draft generates replies before it loads its training copy of the model: the compiled copy
    must be gone by then, or both sit in memory together."""
    import gc
    import weakref

    monkeypatch.setattr(draft_data, "training_prompts", lambda encode, count, seed, max_len: PROMPTS[:count])
    models, optimize = [], zycompile.optimize

    def spy(*args, **kwargs):
        opt = optimize(*args, **kwargs)
        models.append(weakref.ref(opt.model))
        return opt

    monkeypatch.setattr(zycompile, "optimize", spy)
    recipe = zycompile.load_recipe("llama-tiny", FAST)
    draft_data.generate_replies(recipe, tmp_path / "r.jsonl", 2, max_new_tokens=3, batch=2, seed=0, log=print)
    gc.collect()
    assert len(models) == 1 and models[0]() is None


def test_reply_rows_pack_prompt_and_reply_and_cap_each_sequence(tmp_path):
    path = tmp_path / "r.jsonl"
    seqs = [{"prompt": [1, 2], "output": list(range(10, 30))}, {"prompt": [3], "output": [4, 5, 6]}]
    path.write_text("".join(json.dumps(s) + "\n" for s in seqs))
    rows = draft_data.reply_rows(path, seq_len=4, count=3, seed=0)
    assert rows.shape == (3, 4)
    stream = rows.flatten().tolist()
    # each sequence contributes prompt + reply, capped at 2 x seq_len tokens
    first, second = [1, 2, *range(10, 16)], [3, 4, 5, 6]
    assert stream in ((first + second)[:12], (second + first)[:12])
    with pytest.raises(ZyError, match="make 3 rows of 4; 4 requested"):
        draft_data.reply_rows(path, seq_len=4, count=4, seed=0)
    path.write_text("not json\n")
    with pytest.raises(ZyError, match="not a replies file"):
        draft_data.reply_rows(path, seq_len=4, count=1, seed=0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--generate-replies", "3"], "--generate-replies N needs --replies FILE"),
        (["--replies", "/nonexistent/replies.jsonl"], "no such file (--generate-replies N writes it)"),
        (["--replies", "r.jsonl", "--generate-replies", "2", "--reply-batch", "0"], "must be positive"),
    ],
)
def test_train_draft_reply_flags_fail_with_one_clear_error(flags, message, tmp_path, capsys):
    from zycompile.cli import main

    assert main(["train-draft", "--out", str(tmp_path / "h.safetensors"), *flags]) == 2
    assert message in capsys.readouterr().err
