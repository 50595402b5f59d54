"""``zycompile::tuned_linear(x, w, b, plan)``: a linear computed by the candidate a tuning database chose.

``plan`` keys a per-process table (one plan per weight): M -> candidate name, plus the candidate
states built from the weight (prepacked copies). The id is a digest of the weight's geometry and a
sample of its values, so it is the same in every process: a compiled graph saved by the step
artifact cache (``runtime/step_cache.py``) names the same plan when a later process loads it, and
reinstalls the plan's table with ``install``. The op reads the
runtime M (rows of x), so one op serves a static graph (its M is in the table) and a dynamic-length
prefill graph (the nearest tuned M is used; a candidate compiled for one M only, ``inductor_cpp``, is
used at exactly that M). A plan whose weight was written since its states were built
(``load_state_dict``) rebuilds them; an unknown plan id computes the default ``F.linear``. Opaque to
Dynamo and Inductor (register_fake).
"""

from __future__ import annotations

import hashlib
import math
import weakref

import torch
import torch.nn.functional as F

from zycompile.ops.library import define
from zycompile.tuning.candidates import CANDIDATES, DEFAULT, Candidate, state_key


class Plan:
    def __init__(self, w: torch.Tensor | None):
        self.table: dict[int, str] = {}  # M -> candidate name
        self.states: dict[tuple[str, int], tuple[tuple, object]] = {}
        self.storage = lambda: None
        if w is not None:
            self.attach(w)

    def attach(self, w: torch.Tensor) -> None:
        # The plan lives as long as its weight's storage, not the tensor object: fuse_projections hands
        # each graph a fresh view of the fused storage, and a plan tied to that view would die with the
        # graph (torch._dynamo.reset), so the next compile got a new plan id — a different graph, an
        # Inductor/AOTAutograd cache miss — and re-packed the weights. The prepacked copies are freed
        # with the storage (only the storage attached last: a reattached plan keeps its new copies).
        storage = w.untyped_storage()
        self.storage = weakref.ref(storage)
        self._token = token = object()
        weakref.finalize(storage, self.release, token)

    def release(self, token: object = None) -> None:
        if token is None or token is self._token:
            self.states.clear()  # the table stays: a graph still holding this plan id keeps its choices

    def pick(self, m: int) -> str:
        if m in self.table:
            return self.table[m]
        if not self.table:
            return DEFAULT
        return self.table[min(self.table, key=lambda t: abs(math.log(t / m)))]

    def state(self, cand: Candidate, w: torch.Tensor, m: int):
        held = self.states.get(state_key(cand, m))
        if held is None or held[0] != _ident(w):
            with torch.no_grad():
                self.adopt(cand, w, m, cand.prepare(w.detach(), m))
            return self.states[state_key(cand, m)][1]
        return held[1]

    def adopt(self, cand: Candidate, w: torch.Tensor, m: int, state) -> None:
        """Use ``state``, already built from ``w`` for ``m`` rows, as ``cand``'s (the tuner's timing)."""
        self.states[state_key(cand, m)] = (_ident(w), state)


def _ident(w: torch.Tensor) -> tuple[int, int]:
    """The memory and version a state was built from: another tensor or an in-place write rebuilds it."""
    return w.data_ptr(), w._version


PLANS: dict[int, Plan] = {}


def plan_id(w: torch.Tensor) -> int:
    """A digest of ``w``'s dtype, geometry and 16 sampled values (< 2**56, an int arg of the op)."""
    with torch.no_grad():
        flat = w.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 16)][:16].float().cpu().tolist()
    key = (str(w.dtype), tuple(w.shape), w.stride(), w.storage_offset(), w.untyped_storage().nbytes(), sample)
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:7], "little")


def plan_for(w: torch.Tensor) -> int:
    """The plan id of weight ``w``, shared by all graphs, re-traces and processes that see this weight.

    Two weights with one id (equal samples) stay correct: a plan's states are rebuilt whenever the
    weight handed to the op is another tensor's memory (``Plan.state``)."""
    pid = plan_id(w)
    plan = PLANS.get(pid)
    if plan is None:
        PLANS[pid] = Plan(w)
    elif plan.storage() is not w.untyped_storage():
        plan.states.clear()
        plan.attach(w)
    return pid


def install(pid: int, table: dict[int, str]) -> None:
    """Reinstall a saved graph's plan: its table now, its states from the weight at the first call."""
    PLANS.setdefault(pid, Plan(None)).table.update(table)


def _tuned_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, plan: int) -> torch.Tensor:
    p = PLANS.get(plan)
    if p is None:
        return F.linear(x, w, b)
    if p.storage() is None:  # installed from a saved graph, or its weight was freed
        p.attach(w)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m = x2.shape[0]
    cand = CANDIDATES[p.pick(m)]
    if (cand.exact_m or cand.per_m) and m not in p.table:
        # a kernel compiled for another M (inductor_cpp in a dynamic prefill): building one per new
        # length would compile again on every prompt and keep each copy
        return F.linear(x, w, b)
    y = cand.run(x2, p.state(cand, w, m), b)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _fake(x, w, b, plan):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


tuned_linear = define(
    "tuned_linear", "(Tensor x, Tensor w, Tensor? b, int plan) -> Tensor", _tuned_linear, _fake
)
