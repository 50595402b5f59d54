"""Prefill beside decode (runtime/prefill_worker.py): a new prompt runs on a background thread while the
others decode, and every request still gets exactly its solo tokens. Real Inductor graphs: the overlap
needs in-place cache writes, which AOTAutograd alone does not give."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import zycompile
from zycompile.errors import RecipeError
from zycompile.intraop import threads
from zycompile.runtime.compile_gate import CompileGate
from zycompile.runtime.engine import Engine
from zycompile.runtime.prefill_worker import overlap_threads
from zycompile.runtime.sampling import SamplingParams

FAST = ["runtime.prefill_buckets=[8, 16]", "runtime.max_seq_len=96", "runtime.prefill=dynamic"]
STATIC = [*FAST[:2], "runtime.prefill=buckets"]  # the worker pads chunks of <= 16 tokens to a bucket
# three to start decoding, then three joining: two long enough for several chunks, one of 2 tokens
PROMPTS = [
    [11, 4, 29],
    list(range(60, 72)),
    [300, 301, 302, 9, 9, 9],
    list(range(120, 165)),
    [42, 43],
    list(range(400, 425)),
]


def _params(n=10):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """The overlap splits 2+ intra-op threads; an xdist worker on CI has 1 (one worker per core), so
    this module runs on 2 (the other worker's tests share the cores meanwhile: slower, not wrong)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


def _overlap_gen(overrides):
    torch._dynamo.reset()
    opt = zycompile.optimize(
        "tiny:llama", "llama-tiny", overrides=[*overrides, "runtime.prefill_overlap=true"]
    )
    return opt.generator()


@pytest.fixture(scope="module")
def gen():
    return _overlap_gen(FAST)


@pytest.mark.parametrize("prefill", ["dynamic", "buckets"])
def test_prompts_prefilled_beside_decode_get_their_solo_tokens(gen, prefill):
    if prefill == "buckets":  # 40- and 30-token prompts: the worker runs several padded chunks
        gen = _overlap_gen(STATIC)
    solo = [gen.generate([p], max_new_tokens=10, ignore_eos=True).tokens[0] for p in PROMPTS]
    eng = Engine(gen, max_concurrency=3)
    assert eng.worker is not None and eng.decode_threads == torch.get_num_threads() - eng.worker.threads
    reqs = [eng.add_request(p, _params()) for p in PROMPTS[:3]]
    for _ in range(5):  # the first three are decoding when the rest arrive
        eng.step()
    reqs += [eng.add_request(p, _params()) for p in PROMPTS[3:]]
    eng.run()
    assert [r.output for r in reqs] == solo
    assert eng.overlapped >= 3  # the late three at least ran on the worker
    assert not eng.worker.busy


def test_overlap_off_runs_every_prompt_on_the_engine_thread(gen):
    eng = Engine(gen, max_concurrency=3)
    eng.worker = None  # what runtime.prefill_overlap=false gives
    reqs = [eng.add_request(p, _params(6)) for p in PROMPTS]
    eng.run()
    assert eng.overlapped == 0 and all(len(r.output) == 6 for r in reqs)


def test_concurrency_one_never_starts_the_worker(gen):
    assert Engine(gen, max_concurrency=1).worker is None


def test_on_where_it_cannot_apply_is_one_clear_error(gen):
    with threads(1), pytest.raises(RecipeError, match="prefill_overlap.*1 intra-op thread"):
        overlap_threads(gen)
    torch._dynamo.reset()
    eager = [*FAST, "lowering.backend=aot_eager"]
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=[*eager, "runtime.prefill_overlap=true"])
    with pytest.raises(RecipeError, match=r"prefill_overlap.*lowering.backend 'aot_eager'"):
        Engine(opt.generator(), max_concurrency=2)
    default = zycompile.optimize("tiny:llama", "llama-tiny", overrides=eager)
    assert Engine(default.generator(), max_concurrency=2).worker is None  # off unless asked for


def test_gate_runs_a_compiling_call_alone():
    gate, log = CompileGate(), []

    def shared(name):
        with gate.shared():
            log.append(f"{name} in")
            time.sleep(0.05)
            log.append(f"{name} out")

    def exclusive():
        with gate.exclusive():
            log.append("x in")
            time.sleep(0.02)
            log.append("x out")

    a = threading.Thread(target=shared, args=("a",))
    a.start()
    time.sleep(0.01)
    x = threading.Thread(target=exclusive)
    x.start()
    time.sleep(0.01)
    a.join(), x.join()
    with gate.shared():  # free again
        pass
    assert log == ["a in", "a out", "x in", "x out"]
