"""Per-request sampling parameters and the token sampler (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

import dataclasses

import torch

from zycompile.errors import GenerationError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens!r} (expected an integer >= 1)")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            problems.append(f"temperature={self.temperature!r} (expected a number >= 0; 0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k={self.top_k!r} (expected an integer >= 0; 0 = off)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            problems.append(f"top_p={self.top_p!r} (expected a number in (0, 1])")
        if problems:
            raise GenerationError("bad sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V]; rows beyond ``params`` (bucket padding) get argmax."""
    out = logits.argmax(dim=-1)
    for row, p in enumerate(params):
        if p.greedy:
            continue
        probs = probabilities(logits[row], p)
        out[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
    return out


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from: temperature, then top-k, then top-p (nucleus).

    ``logits`` is [..., V] (speculative decoding asks for several positions at once)."""
    x = logits.float() / max(p.temperature, 1e-6)
    if p.top_k and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum - sorted_x.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return x.softmax(-1)
