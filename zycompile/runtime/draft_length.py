"""Cost-aware draft length (``speculative.cost_aware``): verify only the drafts that pay for their width.

A verify over k+1 positions does not cost what one token does on this CPU: at batch 1 a verify of
M = 2 positions took 1.06x a plain step, M = 3 1.41x, M = 4 1.31x (tuned GEMM), M = 5 1.99x
(``bench/spec_profile.py``). So each round keeps, of the k drafts it got, the prefix length k' that
maximises expected tokens per second:

    (1 + sum_{j <= k'} P(drafts 1..j all accepted)) / cost(k')

cost(k') is this process's own measurement: a moving average of the wall time of every verify width
(k' = 0: a plain decode step) it has run, a width's first (compiling) call left out; a width not timed
yet is assumed as cheap as the widest timed one below it, so it gets tried. P comes from the drafter
when it knows (EAGLE: the product of its head's probabilities), else it is a^j with a the measured
per-draft acceptance rate (ngram). Greedy output is unchanged: only the verify width moves.
"""

from __future__ import annotations

import torch


class DraftLength:
    def __init__(self, k_max: int, allow_plain: bool, smoothing: float = 0.2):
        self.ms: list[float | None] = [None] * (k_max + 1)  # per k' (0: plain decode step)
        self.allow_plain = allow_plain  # False: the drafter needs every round's verify (EAGLE)
        self.smoothing = smoothing
        self.hits, self.misses = 0, 0

    def observe_time(self, k: int, ms: float) -> None:
        old = self.ms[k]
        self.ms[k] = ms if old is None else old + self.smoothing * (ms - old)

    def observe_accept(self, accepted: list[int], k: int) -> None:
        """Per-draft acceptance: a row that accepted n of k drafts tried n + (n < k) of them."""
        self.hits += sum(accepted)
        self.misses += sum(n < k for n in accepted)

    @property
    def rate(self) -> float:
        return (self.hits + 1) / (self.hits + self.misses + 2)

    def cost(self, k: int) -> float:
        if self.ms[k] is not None:
            return self.ms[k]
        known = [ms for ms in self.ms[:k] if ms is not None]
        return known[-1] if known else 1.0

    def choose(self, k: int, confidence: torch.Tensor | None) -> int:
        """The draft count to verify, of ``k`` drafted; ``confidence`` [k]: P(drafts 1..j accepted)."""
        if confidence is None:
            p = [self.rate**j for j in range(1, k + 1)]
        else:
            p = confidence[:k].tolist()
        best, best_rate = k, -1.0
        for kk in range(0 if self.allow_plain else 1, k + 1):
            gain = 1.0 + sum(p[:kk])
            r = gain / self.cost(kk)
            if r > best_rate:
                best, best_rate = kk, r
        return best
