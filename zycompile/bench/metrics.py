"""Serving metrics from per-request timestamps, the way vLLM's ``bench serve`` defines them."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable


@dataclasses.dataclass
class RequestTiming:
    arrival: float
    token_times: list[float]  # when each output token was available
    prompt_len: int = 0
    cached_len: int = 0  # prompt tokens served from the engine's prefix cache

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (None with fewer than 2 tokens)."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def output_tok_s(self) -> float | None:
        """The decode speed this user sees: 1 / TPOT."""
        t = self.tpot
        return 1.0 / t if t else None


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(timings: list[RequestTiming]) -> dict[str, float]:
    """Aggregate metrics; times in ms, rates per second."""
    done = [t for t in timings if t.token_times]
    if not done:
        return {"completed": 0}
    start = min(t.arrival for t in done)
    end = max(t.token_times[-1] for t in done)
    duration = end - start
    out_tokens = sum(len(t.token_times) for t in done)
    ttfts = [t.ttft * 1e3 for t in done]
    tpots = [t.tpot * 1e3 for t in done if t.tpot is not None]
    itls = [x * 1e3 for t in done for x in t.itls]
    rates = [t.output_tok_s for t in done if t.output_tok_s]
    return {
        "completed": len(done),
        "duration_s": duration,
        "output_tokens": out_tokens,
        "input_tokens": sum(t.prompt_len for t in done),
        "prefix_cached_tokens": sum(t.cached_len for t in done),
        "request_throughput": len(done) / duration if duration > 0 else float("nan"),
        "output_throughput": out_tokens / duration if duration > 0 else float("nan"),
        "ttft_mean_ms": statistics.mean(ttfts),
        "ttft_median_ms": _pct(ttfts, 0.5),
        "ttft_p99_ms": _pct(ttfts, 0.99),
        "tpot_mean_ms": statistics.mean(tpots) if tpots else float("nan"),
        "tpot_median_ms": _pct(tpots, 0.5),
        "tpot_p99_ms": _pct(tpots, 0.99),
        "itl_median_ms": _pct(itls, 0.5),
        "itl_p99_ms": _pct(itls, 0.99),
        "per_request_tok_s_median": _pct(rates, 0.5) if rates else float("nan"),
    }


def tokens_per_dollar(output_throughput: float, price_per_hour: float | None) -> float | None:
    """Output tokens per US dollar at a given machine price (an input, not a fact we assert)."""
    if not price_per_hour:
        return None
    return output_throughput * 3600.0 / price_per_hour


def prefill_mfu(timings: list[RequestTiming], flops: Callable[[int, int], float], peak: float) -> float:
    """Median over requests of prefill FLOPs / TTFT / peak FLOP/s: how close time to first token comes
    to the machine's compute ceiling (meaningful where TTFT is prefill alone: concurrency 1).
    ``flops(prompt_len, cached_len)``: the FLOPs the prefill computed (the prefix cache's are not)."""
    done = [t for t in timings if t.token_times and t.ttft > 0]
    return _pct([flops(t.prompt_len, t.cached_len) / t.ttft / peak for t in done], 0.5)
