"""N gloo ranks in child processes on this machine, running functions sent to them.

For tests and benchmarks of sharded code without torchrun: the ranks start once (importing torch
costs seconds), then each ``run(fn, *args)`` calls ``fn(*args)`` on every rank and returns the
results in rank order. ``fn`` must be importable by name (a module-level function). A rank that
raises fails the call with its traceback; one that hangs trips ``timeout_s``.
"""

from __future__ import annotations

import datetime
import queue
import socket
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results, threads: int, timeout_s: float) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class LocalGroup:
    def __init__(self, world: int, threads: int = 1, timeout_s: float = 120.0):
        ctx = mp.get_context("spawn")
        self.world, self.timeout_s = world, timeout_s
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(r, world, port, self.tasks[r], self.results, threads, timeout_s),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, *args: Any) -> list[Any]:
        for q in self.tasks:
            q.put((fn, args))
        out: list[Any] = [None] * self.world
        errors = []
        for _ in range(self.world):
            try:
                rank, ok, value = self.results.get(timeout=self.timeout_s + 30)
            except queue.Empty:
                raise TimeoutError(
                    f"a rank did not answer {fn.__name__} within {self.timeout_s + 30:.0f} s"
                ) from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise RuntimeError(f"{fn.__name__} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return out

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    def __enter__(self) -> LocalGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
