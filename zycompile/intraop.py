"""Intra-op thread counts per Python thread.

ATen's count is per thread (OpenMP's ICV), but a thread's first ATen call lazily re-initialises it from
the process default, undoing an earlier ``torch.set_num_threads`` on that thread; ``init_thread``
forces that init first. Used by worker threads that must run with fewer threads than the engine's
(the prefill worker, ``split_n``'s single-threaded GEMM workers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def init_thread(n: int) -> None:
    """Give the calling thread ``n`` intra-op threads for good (a ThreadPoolExecutor initializer)."""
    torch.get_num_threads()  # ATen's lazy per-thread init first, or it would undo the next line
    torch.set_num_threads(n)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads on this thread, then restore the count."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
