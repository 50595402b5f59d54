"""Process groups for the recipe's ``parallel`` section, set up once per process.

Under ``torchrun`` (``WORLD_SIZE`` / ``RANK`` / ``MASTER_ADDR`` in the environment) ``setup`` joins
the job: gloo on CPU, NCCL on CUDA (RCCL on ROCm, through the same name). A process that already
called ``init_process_group`` (tests spawning ranks) keeps its group. ``timeout_s`` bounds every
collective, so a rank that died or hangs ends the others with an error instead of a silent hang.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from zycompile.errors import ZyError

_SEQUENCE_GROUP: dist.ProcessGroup | None = None


class DistributedError(ZyError):
    """The parallel setup does not match the launch (world size, missing group, ...)."""


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(parallel, device: torch.device | str = "cpu") -> dist.ProcessGroup | None:
    """Join (or check) the process group the recipe's ``parallel`` section asks for."""
    global _SEQUENCE_GROUP
    if parallel.mode == "none":
        if dist.is_initialized() and dist.get_world_size() > 1 or launched_world_size() > 1:
            raise DistributedError(
                f"launched with {max(launched_world_size(), 1)} ranks but the recipe's parallel.mode is "
                "'none'; set parallel.mode (sp) and parallel.degree, or launch one process"
            )
        return None
    if not dist.is_initialized():
        if launched_world_size() == 1 and "MASTER_ADDR" not in os.environ:
            raise DistributedError(
                f"parallel.mode '{parallel.mode}' with degree {parallel.degree} needs {parallel.degree} "
                f"processes: launch with torchrun --nproc-per-node {parallel.degree} -m zycompile ..."
            )
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=parallel.timeout_s))
    if dist.get_world_size() != parallel.degree:
        raise DistributedError(
            f"parallel.degree is {parallel.degree} but {dist.get_world_size()} ranks were launched; "
            "they must match"
        )
    # sp / tsp split the KV cache along the sequence over this group; tp splits heads over it
    _SEQUENCE_GROUP = dist.group.WORLD if parallel.mode in ("sp", "tsp") else None
    return dist.group.WORLD


def sequence_group() -> dist.ProcessGroup:
    if _SEQUENCE_GROUP is None:
        raise DistributedError(
            "no sequence-parallel group: the recipe needs parallel.mode 'sp' (or 'tsp') and the ranks must "
            "be launched together (torchrun)"
        )
    return _SEQUENCE_GROUP


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_rank() -> bool:
    return rank() == 0
