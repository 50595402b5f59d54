"""Counts of the collectives our attention ops issue: the numbers tests assert and benchmarks report.

Ops call ``record`` as they communicate, so a test can say "tree attention issued exactly 2
all-reduces per layer" and ``bench/tree_vs_ring.py`` can report rounds and bytes per token without
a profiler. Counting is a few Python adds per collective, negligible next to the collective itself.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

_calls: collections.Counter[str] = collections.Counter()
_bytes: collections.Counter[str] = collections.Counter()


def record(kind: str, nbytes: int) -> None:
    """One collective of ``kind`` ('all_reduce', 'send', 'recv', ...) moving ``nbytes`` from this rank."""
    _calls[kind] += 1
    _bytes[kind] += nbytes


def reset() -> None:
    _calls.clear()
    _bytes.clear()


def snapshot() -> dict[str, dict[str, int]]:
    return {"calls": dict(_calls), "bytes": dict(_bytes)}


@contextlib.contextmanager
def counting() -> Iterator[dict[str, dict[str, int]]]:
    """``with counting() as stats:`` — stats holds the calls and bytes issued inside the block."""
    before_calls, before_bytes = collections.Counter(_calls), collections.Counter(_bytes)
    stats: dict[str, dict[str, int]] = {"calls": {}, "bytes": {}}
    try:
        yield stats
    finally:
        stats["calls"].update({k: v for k, v in (_calls - before_calls).items() if v})
        stats["bytes"].update({k: v for k, v in (_bytes - before_bytes).items() if v})
