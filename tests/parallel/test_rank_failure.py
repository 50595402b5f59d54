"""A rank that dies or hangs ends the others with an error within parallel.timeout_s, not a silent hang."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zycompile.parallel.distributed import setup
from zycompile.parallel.local_group import _free_port
from zycompile.recipe import ParallelSection

TIMEOUT_S = 4.0


def _rank(rank: int, port: int, fault: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    setup(ParallelSection(mode="tp", degree=2, timeout_s=TIMEOUT_S))
    x = torch.ones(4)
    dist.all_reduce(x)  # both alive: fine
    if rank == 1:
        if fault == "dies":
            os._exit(17)
        time.sleep(60)  # hangs: never joins the next collective
        return
    t0 = time.perf_counter()
    try:
        dist.all_reduce(x)
        results.put(("no error", time.perf_counter() - t0))
    except Exception as e:  # noqa: BLE001 - the point is which error, and when
        results.put((type(e).__name__ + ": " + str(e)[:200], time.perf_counter() - t0))


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_peer_failure_is_an_error_within_the_timeout(fault):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, fault, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        error, waited = results.get(timeout=60)
    finally:
        for p in procs:
            p.kill()
    assert error != "no error"
    assert waited < TIMEOUT_S + 10, f"rank 0 waited {waited:.1f}s ({error})"
