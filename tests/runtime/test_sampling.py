from __future__ import annotations

import pytest
import torch

from zycompile.errors import GenerationError
from zycompile.runtime.sampling import SamplingParams, probabilities, sample


def test_top_k_keeps_k_tokens():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p > 0).nonzero().flatten().tolist() == [1, 3]
    assert p.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p = probabilities(probs.log(), SamplingParams(temperature=1.0, top_p=0.75))
    assert (p > 0).tolist() == [True, True, False, False]
    torch.testing.assert_close(p[:2], torch.tensor([0.625, 0.375]))


def test_sample_frequencies_follow_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).log_softmax(-1)
    g = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=1.0)]
    draws = torch.stack([sample(logits.clone(), params, [g]) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / 4000
    torch.testing.assert_close(freq, logits.exp()[0], atol=0.03, rtol=0)


def test_stop_string_is_a_tuple_and_bad_params_raise():
    assert SamplingParams(stop="###").stop == ("###",)
    with pytest.raises(GenerationError, match="top_k"):
        SamplingParams(top_k=-1)
