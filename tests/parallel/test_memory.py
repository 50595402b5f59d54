"""LiveBytes: the peak bytes of tensors a block creates and holds at once (weights and inputs excluded)."""

from __future__ import annotations

import torch

from zycompile.parallel.memory import LiveBytes


def test_live_bytes_counts_created_tensors_until_they_die():
    w = torch.ones(1000)  # 4000 bytes that exist before: never counted
    with LiveBytes(keep=[w]) as live:
        a = w * 2  # +4000
        b = a.view(10, 100)  # a view shares a's storage: +0
        c = a + 1  # +4000 -> 8000
        del a, b  # a's storage dies with its last tensor
        d = c * 3  # +4000 -> 8000 again, not 12000
        w.add_(1)  # in place on an excluded storage: +0
    assert live.peak == live.peak_compute == 8000
    assert live.live == 8000  # c and d are still alive
    del c, d
    assert live.live == 0


def test_live_bytes_lists_what_is_alive_at_the_peak():
    w = torch.ones(1000)
    with LiveBytes(keep=[w]) as live:
        a = w * 2  # 4000
        b = torch.cat([a, a])  # 8000 -> peak 12000 with a
        del a, b
        c = w + 1  # 4000: below the peak, changes nothing
    assert live.peak == 12000
    assert live.top() == [(8000, "aten.cat.default [2000]"), (4000, "aten.mul.Tensor [1000]")]
    del c
