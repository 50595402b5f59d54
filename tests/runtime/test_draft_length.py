"""Cost-aware draft length: the verify width that maximises expected tokens per measured millisecond."""

from __future__ import annotations

import torch

from zycompile.runtime.draft_length import DraftLength

# ms per verify of k drafts on this CPU (bench/spec_profile.py): k = 0 is a plain decode step
MS = [24.8, 26.2, 34.8, 32.5, 49.4]


def _timed(allow_plain=True) -> DraftLength:
    length = DraftLength(4, allow_plain=allow_plain)
    for k, ms in enumerate(MS):
        length.observe_time(k, ms)
    return length


def test_confident_drafts_skip_the_slow_width():
    length = _timed()
    # 3 drafts on a cheap M=4 verify beat 2 on the slower M=3 one; the 4th (M=5) does not pay
    assert length.choose(4, torch.tensor([0.9, 0.8, 0.7, 0.3])) == 3
    assert length.choose(4, torch.tensor([0.5, 0.1, 0.05, 0.01])) == 1
    assert length.choose(2, torch.tensor([0.9, 0.8])) == 2  # only what was drafted


def test_unknown_confidence_uses_the_measured_acceptance_and_may_skip_the_verify():
    length = _timed()
    length.observe_accept([0] * 50, 1)  # every draft rejected: a plain step pays best
    assert length.rate < 0.05 and length.choose(4, None) == 0
    assert _timed(allow_plain=False).choose(4, torch.tensor([0.01] * 4)) == 1  # EAGLE always verifies
    length = _timed()
    length.observe_accept([4] * 50, 4)  # everything accepted: still not the slow M=5 verify
    assert length.rate > 0.99 and length.choose(4, None) == 3
    assert length.choose(2, None) == 2


def test_untimed_widths_are_assumed_cheap_so_they_get_tried():
    length = DraftLength(3, allow_plain=True)
    assert length.choose(3, torch.tensor([0.5, 0.4, 0.3])) == 3  # nothing timed yet: all cost the same
    length.observe_time(1, 20.0)
    assert length.cost(2) == 20.0 and length.cost(0) == 1.0
    length.observe_time(1, 30.0)
    assert length.ms[1] == 22.0  # moving average
