"""Hugging Face baselines, run on the same requests: eager ``generate`` and static cache + torch.compile.

HF has no continuous batching, so at concurrency c requests are served in static batches of c
(left-padded, in arrival order): a batch starts when its last member has arrived and the previous
batch is done, and runs until its longest reply is finished. Token timestamps come from a logits
processor, called once per generated position for the whole batch.
"""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from zycompile.bench.metrics import RequestTiming
from zycompile.bench.workload import WorkItem


def stock_static_kwargs() -> dict:
    """HF's stock fast path: static cache + its automatic torch.compile of the decode step.

    HF auto-compiles only on accelerators unless told otherwise; ``_compile_all_devices`` is its
    switch for CPUs. Mode "default": "reduce-overhead" means CUDA graphs, which a CPU has not.
    """
    from transformers import CompileConfig

    cfg = CompileConfig(fullgraph=True, dynamic=False, backend="inductor", mode="default")
    cfg._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": cfg}


class _StepClock(LogitsProcessor):
    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


class HFRunner:
    def __init__(self, model, pad_token_id: int, static: bool, max_len: int):
        self.model, self.pad, self.static, self.max_len = model, pad_token_id, static, max_len

    def generate(self, prompts: list[tuple[int, ...]], new_tokens: int) -> list[float]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as HF decoder-only generation wants
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        clock = _StepClock()
        kw = dict(
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # like ignore_eos: every system produces the same lengths
            pad_token_id=self.pad,
            logits_processor=LogitsProcessorList([clock]),
        )
        if self.static:
            kw.update(stock_static_kwargs())
        with torch.no_grad():
            self.model.generate(ids, **kw)
        return clock.times

    def warmup(self, batch: int) -> None:
        """Compile (static) and size the cache once for the longest request, as a server would."""
        # HF sizes (and then reuses) its static cache by prompt + new tokens: a long prompt reaches the
        # size with one prefill instead of hundreds of decode steps.
        prompt = tuple([self.pad + 1] * (max(self.max_len - 4, 1) if self.static else 8))
        self.generate([prompt] * batch, 4)

    def serve(self, items: list[WorkItem], concurrency: int) -> list[RequestTiming]:
        t0 = time.perf_counter()
        out: list[RequestTiming] = []
        for i in range(0, len(items), concurrency):
            group = items[i : i + concurrency]
            start_at = t0 + max(it.arrival for it in group)
            delay = start_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()  # the batch's requests are sent together when it starts
            times = self.generate([it.prompt_ids for it in group], max(it.output_len for it in group))
            for it in group:
                out.append(
                    RequestTiming(max(sent, t0 + it.arrival), times[: it.output_len], len(it.prompt_ids))
                )
        return out
