"""What one rank holds: weight bytes (DTensor shards count their local part), KV-cache bytes, and the
peak bytes of the activations a forward creates (``LiveBytes``)."""

from __future__ import annotations

import collections
import weakref

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from zycompile.parallel.tp import local_bytes


def rank_memory(model: torch.nn.Module, cache=None) -> dict[str, int]:
    seen, weights = set(), 0
    for p in model.parameters():  # tied weights counted once
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.data_ptr() in seen:
            continue
        seen.add(local.data_ptr())
        weights += local_bytes(p)
    return {"weights": weights, "kv_cache": cache.nbytes() if cache is not None else 0}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the block and alive at the same time (CPU has no
    allocator statistics). Every op output's storage is counted once from its first tensor until its
    last Python tensor dies; storages that existed before (weights, KV cache, inputs: ``keep``) never
    count. ``peak`` is everything; ``peak_compute`` leaves out collectives' outputs (received weight
    shards, gathered K/V, reduced sums), so the two bound what the communication buffers add. Kernel
    workspaces inside one op (SDPA's blocks) are invisible to both. ``at_peak`` lists what was alive
    when ``peak`` was reached (``top()``: the largest, with the op that made each).
    """

    def __init__(self, keep=()):
        super().__init__()
        self.external = {t.untyped_storage().data_ptr() for t in keep}
        self.refs: collections.Counter[int] = collections.Counter()
        self.sizes: dict[int, tuple[int, bool]] = {}
        self.made_by: dict[int, str] = {}  # live storage -> "op [shape]" of its first tensor
        self.at_peak: list[tuple[int, str]] = []
        self.live = self.live_compute = self.peak = self.peak_compute = 0
        self._op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        comm = func.namespace == "_c10d_functional"
        self._op = f"{func.namespace}.{func.__name__}"
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, comm)
        return out

    def _track(self, t: torch.Tensor, comm: bool) -> None:
        if is_traceable_wrapper_subclass(t):  # DTensor, a collective's async wrapper: count what they hold
            for name in t.__tensor_flatten__()[0]:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    self._track(inner, comm)
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.external or key == 0:
            return
        if self.refs[key] == 0:
            self.sizes[key] = (storage.nbytes(), comm)
            self.made_by[key] = f"{self._op} {list(t.shape)}"
            self.live += storage.nbytes()
            self.live_compute += 0 if comm else storage.nbytes()
            if self.live > self.peak:
                self.at_peak = [(n, self.made_by[k]) for k, (n, _) in self.sizes.items()]
            self.peak = max(self.peak, self.live)
            self.peak_compute = max(self.peak_compute, self.live_compute)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            nbytes, comm = self.sizes.pop(key)
            del self.made_by[key]
            self.live -= nbytes
            self.live_compute -= 0 if comm else nbytes

    def top(self, n: int = 8) -> list[tuple[int, str]]:
        """The ``n`` largest storages alive at the peak: ``(bytes, "op [shape]")``, largest first."""
        return sorted(self.at_peak, reverse=True)[:n]


def model_tensors(model: torch.nn.Module, cache=None) -> list[torch.Tensor]:
    """What a forward reads but does not create: parameters' local shards, buffers, the KV cache."""
    out = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    out += list(model.buffers())
    if cache is not None:
        out += [*cache.keys, *cache.values]
    return out
