import json

import pytest

from zycompile.data import SampledRequest, load_conversations, sample_random, sample_sharegpt
from zycompile.data.sharegpt import default_data_path, parse_truncated_array


class WordTokenizer:
    """Stands in for a HF tokenizer: one token per whitespace-separated word."""

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return [len(w) % 500 for w in text.split()]


class ToyVocabTokenizer:
    all_special_ids = [0, 1, 2]

    def __len__(self):
        return 50

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


# ------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, n, dropped",
    [
        ('[{"a": 1}, {"b": [1, 2]}]', 2, 0),
        ("  [ ]  ", 0, 0),
        ('[{"a": 1}, {"b": "cut her', 1, len('{"b": "cut her')),
        ('[{"a": 1}, {"b": tr', 1, len('{"b": tr')),
        ('[{"a": 1}, {"b": 12', 1, len('{"b": 12')),
        ('[{"a": 1}, {"b":', 1, len('{"b":')),
        ('[{"a": 1},\n  ', 1, 0),
        ('[{"a": 1}', 1, 0),
    ],
)
def test_parse_truncated_array(text, n, dropped):
    items, got_dropped = parse_truncated_array(text)
    assert len(items) == n and got_dropped == dropped
    if n:
        assert items[0] == {"a": 1}


@pytest.mark.parametrize(
    "text", ['[{"a": 1}, {"b": 1,, "c": 2}, {"d": 3}]', '[{"a": 1} {"b": 2}]', '{"a": 1}']
)
def test_parse_rejects_errors_before_the_end(text):
    with pytest.raises(ValueError, match="malformed JSON|expected"):
        parse_truncated_array(text)


def test_load_conversations_complete_records():
    convs = load_conversations()
    assert len(convs) > 17000
    assert all(isinstance(c["conversations"], list) and "id" in c for c in convs)
    first = convs[0]["conversations"][0]
    assert first["from"] == "human" and isinstance(first["value"], str)
    # The shipped file really is cut off: plain json.load must fail on it.
    with pytest.raises(json.JSONDecodeError):
        json.loads(default_data_path().read_text(encoding="utf-8"))


def test_load_conversations_is_cached_but_returns_fresh_lists():
    a, b = load_conversations(), load_conversations()
    assert a is not b and a[0] is b[0]
    a.clear()
    assert len(load_conversations()) == len(b)


def test_load_conversations_custom_path(tmp_path):
    path = tmp_path / "mini.json"
    path.write_text('[{"id": "x", "conversations": [{"from": "human", "value": "hi"}]}, {"id": "y", "conv')
    assert [c["id"] for c in load_conversations(str(path))] == ["x"]


# ------------------------------------------------------------------------------------------ sampling


def test_sample_sharegpt_deterministic_and_seeded():
    tok = WordTokenizer()
    a = sample_sharegpt(tok, 50, seed=1)
    assert a == sample_sharegpt(WordTokenizer(), 50, seed=1)
    assert a != sample_sharegpt(WordTokenizer(), 50, seed=2)
    assert len(a) == 50 and all(isinstance(r, SampledRequest) for r in a)
    # Lazy: only a little more than the requested number of conversations is tokenized.
    assert tok.calls < 400


def test_sample_sharegpt_filters():
    tok = WordTokenizer()
    reqs = sample_sharegpt(tok, 200, seed=0, max_prompt_len=64, max_total_len=160, max_output_len=100)
    assert len(reqs) == 200
    for r in reqs:
        assert 4 <= r.prompt_len <= 64
        assert 4 <= r.output_len <= 100
        assert r.prompt_len + r.output_len <= 160
        assert r.prompt_len == len(tok.encode(r.prompt)) == len(r.prompt_token_ids)
    assert max(r.output_len for r in reqs) == 100  # the cap is reached, so it really capped


def test_sample_sharegpt_prompts_are_first_turns():
    pairs = {
        c["conversations"][0]["value"]: c["conversations"][1]["value"]
        for c in load_conversations()
        if len(c["conversations"]) >= 2
    }
    tok = WordTokenizer()
    for r in sample_sharegpt(tok, 20, seed=5):
        assert r.prompt in pairs
        assert r.output_len == len(tok.encode(pairs[r.prompt]))


def test_sample_sharegpt_errors():
    with pytest.raises(ValueError, match="num_requests must be positive"):
        sample_sharegpt(WordTokenizer(), 0)
    with pytest.raises(ValueError, match="max_output_len"):
        sample_sharegpt(WordTokenizer(), 1, max_output_len=2)
    with pytest.raises(ValueError, match="pass the filters"):
        sample_sharegpt(WordTokenizer(), 10, max_prompt_len=4, max_total_len=8)


def test_sample_random_vocab_size():
    reqs = sample_random(512, 4, input_len=32, output_len=16, seed=3)
    assert reqs == sample_random(512, 4, input_len=32, output_len=16, seed=3)
    assert reqs != sample_random(512, 4, input_len=32, output_len=16, seed=4)
    for r in reqs:
        assert r.prompt_len == 32 == len(r.prompt_token_ids) and r.output_len == 16
        assert all(0 <= t < 512 for t in r.prompt_token_ids)
        assert r.prompt.split() == [str(t) for t in r.prompt_token_ids]


def test_sample_random_tokenizer_skips_special_tokens():
    reqs = sample_random(ToyVocabTokenizer(), 8, input_len=20, output_len=5)
    ids = {t for r in reqs for t in r.prompt_token_ids}
    assert ids <= set(range(3, 50)) and len(ids) > 20
    assert reqs[0].prompt == " ".join(f"w{i}" for i in reqs[0].prompt_token_ids)
    with pytest.raises(ValueError, match="positive"):
        sample_random(512, 1, input_len=0, output_len=4)


@pytest.mark.slow
def test_sample_sharegpt_with_smollm2_tokenizer():
    from zycompile.models import load_model

    tok = load_model("smollm2-135m-instruct").tokenizer
    reqs = sample_sharegpt(tok, 100, seed=0)
    assert reqs == sample_sharegpt(tok, 100, seed=0)
    for r in reqs:
        assert 4 <= r.prompt_len <= 1024 and r.output_len >= 4 and r.prompt_len + r.output_len <= 2048
        assert list(r.prompt_token_ids) == tok.encode(r.prompt)
    rand = sample_random(tok, 2, input_len=64, output_len=8)
    assert all(t not in tok.all_special_ids for r in rand for t in r.prompt_token_ids)
    assert len(tok.encode(rand[0].prompt)) == pytest.approx(64, abs=16)
