"""The target's own replies as draft-head training data (``train-draft --replies``).

A draft head is judged on the target's outputs, and a small target answers nothing like the ShareGPT
replies (written by larger models): trained on the target's own greedy replies to ShareGPT prompts,
the head sees at training time the text it drafts for. The replies are generated once with the
recipe's compiled runtime (continuous batching over ``batch`` slots) and kept in a JSONL file, one
``{"prompt": [ids], "output": [ids]}`` per line, that later runs reuse. The prompts are the first user
turns of the training conversations only (``train_draft.HELD_OUT`` keeps the benchmarks' out).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from zycompile.errors import ZyError


def training_prompts(
    encode: Callable[[str], list[int]], count: int, seed: int, max_len: int
) -> list[list[int]]:
    """``count`` first user turns of the training conversations as ``encode`` renders them (the
    runtime's chat template), at most ``max_len`` tokens each."""
    from zycompile.data import load_conversations
    from zycompile.train_draft import training_conversations

    prompts = []
    for conv in training_conversations(load_conversations(), seed):
        turn = conv["conversations"][0]
        if turn.get("from") != "human" or not (turn.get("value") or "").strip():
            continue
        ids = encode(turn["value"])
        if len(ids) <= max_len:
            prompts.append(ids)
            if len(prompts) == count:
                break
    return prompts


def generate_replies(
    recipe,
    path: str | Path,
    count: int,
    max_new_tokens: int,
    batch: int,
    seed: int,
    log: Callable,
    max_prompt_len: int = 256,
) -> None:
    """Write the target's greedy replies to ``count`` training prompts of at most ``max_prompt_len``
    tokens to ``path`` (JSONL), as they finish, so an interrupted run keeps what it generated."""
    import zycompile
    from zycompile.runtime.engine import Engine
    from zycompile.runtime.sampling import SamplingParams

    max_prompt = min(max_prompt_len, recipe.runtime.max_seq_len - max_new_tokens)
    if max_prompt < 1:
        raise ZyError(
            f"--reply-len {max_new_tokens} leaves no room for a prompt in runtime.max_seq_len "
            f"{recipe.runtime.max_seq_len}"
        )
    runtime = dataclasses.replace(recipe.runtime, batch_buckets=(batch,))  # one decode batch of `batch`
    opt = zycompile.optimize(None, dataclasses.replace(recipe, runtime=runtime))
    gen = opt.generator()
    prompts = training_prompts(lambda text: gen.encode(text)[0], count, seed, max_prompt)
    if len(prompts) < count:
        if not prompts:
            raise ZyError(
                f"no training prompt fits in {max_prompt} tokens (with the chat template): raise --seq-len"
            )
        log(
            f"only {len(prompts)} training prompts fit in {max_prompt} tokens: generating {len(prompts)} replies"
        )
    engine = Engine(gen, max_concurrency=batch)
    for p in prompts:
        engine.add_request(p, SamplingParams(max_new_tokens=max_new_tokens))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    t0 = last = time.perf_counter()
    written = tokens = 0
    with open(path, "w") as f:
        while engine.has_work:
            engine.step()
            for req in engine.finished[written:]:
                f.write(json.dumps({"prompt": req.prompt, "output": req.output}) + "\n")
                tokens += len(req.output)
            written = len(engine.finished)
            if time.perf_counter() - last > 60 or not engine.has_work:
                last = time.perf_counter()
                f.flush()
                log(f"replies {written}/{len(prompts)} ({tokens / (last - t0):.0f} output tok/s)")


def reply_rows(path: str | Path, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` rows of ``seq_len`` tokens packed from the file's prompt + reply sequences."""
    try:
        seqs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        stream: list[int] = []
        random.Random(seed).shuffle(seqs)
        for s in seqs:
            stream.extend((list(s["prompt"]) + list(s["output"]))[: 2 * seq_len])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ZyError(
            f"--replies {path}: not a replies file (JSONL lines of {{'prompt': [ids], 'output': [ids]}}): {e}"
        ) from None
    if len(stream) < seq_len * count:
        raise ZyError(
            f"--replies {path}: {len(stream)} tokens make {len(stream) // seq_len} rows of {seq_len}; "
            f"{count} requested (--rows + --val-rows): generate more or lower --rows"
        )
    return torch.tensor(stream[: seq_len * count]).view(count, seq_len)
