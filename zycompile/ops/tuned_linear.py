"""``zycompile::tuned_linear(x, w, b, plan)``: a linear computed by the candidate a tuning database chose.

``plan`` indexes a per-process table (one plan per weight: its storage and view geometry): M ->
candidate name, plus the candidate states built from the weight (prepacked copies). The op reads the
runtime M (rows of x), so one op serves a static graph (its M is in the table) and a dynamic-length
prefill graph (the nearest tuned M is used; a candidate compiled for one M only, ``inductor_cpp``, is
used at exactly that M). A plan whose weight was written since its states were built
(``load_state_dict``) rebuilds them; an unknown plan id computes the default ``F.linear``. Opaque to
Dynamo and Inductor (register_fake).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from zycompile.tuning.candidates import CANDIDATES, DEFAULT, Candidate, state_key


class Plan:
    def __init__(self, w: torch.Tensor):
        self.table: dict[int, str] = {}  # M -> candidate name
        self.states: dict[tuple[str, int], tuple[tuple, object]] = {}
        # The plan lives as long as its weight's storage, not the tensor object: fuse_projections hands
        # each graph a fresh view of the fused storage, and a plan tied to that view would die with the
        # graph (torch._dynamo.reset), so the next compile got a new plan id — a different graph, an
        # Inductor/AOTAutograd cache miss — and re-packed the weights. The prepacked copies are freed
        # with the storage, and a new storage that reuses the address gets a new plan.
        storage = w.untyped_storage()
        self.storage = weakref.ref(storage)
        weakref.finalize(storage, self.release)

    def release(self) -> None:
        self.states.clear()  # the table stays: a graph still holding this plan id keeps its choices

    def pick(self, m: int) -> str:
        if m in self.table:
            return self.table[m]
        if not self.table:
            return DEFAULT
        return self.table[min(self.table, key=lambda t: abs(math.log(t / m)))]

    def state(self, cand: Candidate, w: torch.Tensor, m: int):
        key = state_key(cand, m)
        ident = (w.data_ptr(), w._version)
        held = self.states.get(key)
        if held is None or held[0] != ident:
            with torch.no_grad():
                held = (ident, cand.prepare(w.detach(), m))
            self.states[key] = held
        return held[1]


PLANS: list[Plan] = []
_BY_WEIGHT: dict[tuple, int] = {}


def plan_for(w: torch.Tensor) -> int:
    """The plan id of weight ``w`` (one per weight storage and view, shared by all graphs and re-traces)."""
    storage = w.untyped_storage()
    key = (storage.data_ptr(), w.storage_offset(), tuple(w.shape), w.stride(), w.dtype)
    pid = _BY_WEIGHT.get(key)
    if pid is None or PLANS[pid].storage() is not storage:
        pid = _BY_WEIGHT[key] = len(PLANS)
        PLANS.append(Plan(w))
    return pid


@torch.library.custom_op("zycompile::tuned_linear", mutates_args=())
def tuned_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, plan: int) -> torch.Tensor:
    if not 0 <= plan < len(PLANS):
        return F.linear(x, w, b)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m = x2.shape[0]
    p = PLANS[plan]
    cand = CANDIDATES[p.pick(m)]
    if cand.exact_m and m not in p.table:  # a static-shape kernel tuned for another M (dynamic prefill)
        return F.linear(x, w, b)
    y = cand.run(x2, p.state(cand, w, m), b)
    return y.reshape(*x.shape[:-1], w.shape[0])


@tuned_linear.register_fake
def _(x, w, b, plan):
    return x.new_empty((*x.shape[:-1], w.shape[0]))
