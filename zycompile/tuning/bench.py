"""Timing GEMM candidates the TunableOp way, made robust to a shared, noisy CPU.

For one shape: enough (x, weight, bias) buffer sets to span ``rotate_bytes`` (64 MiB, about 2x this
CPU's 36 MiB L3), cycled so no call finds its operands in cache (a decode step streams its weights from
memory too). Each candidate is called the way a compiled graph calls it (``graph_calls``): the default
and ``small_linear`` / ``panel_linear`` (which the ``small_gemm`` pass emits) as direct ops, every other candidate through
the ``zycompile::tuned_linear`` op that ``tuned_gemm`` swaps in, whose Python dispatch costs ~20-40 µs a
call on this CPU. Timing the bare function instead picked packed BLAS for SmolLM2's batch-8 decode
GEMMs by ~10% per shape, with 16 sets (21 MB, inside L3) of its small weights; end to end its step was
56.7 ms against 45.0 with ``small_linear`` (RESULTS.md, 2026-11-28 10:2x).
Each candidate prepares its state for every set (prepacked copies included), is checked against the
default on the first set (else discarded), warmed up over all sets, then timed in ``rounds``
interleaved rounds: per round, per candidate, calls until ``budget_s`` or ``max_iters`` (at least
``min_iters``), and the round's median. A candidate's time is its best round median, so a burst of
noise from another process (which stalls an OpenMP region for a whole scheduler tick) hits one round,
not the verdict. If even the best round median of a candidate is far above its fastest call, the
machine was busy throughout and the shape is measured again (``attempts``). Each round first waits
(up to ``quiet_wait_s``) until no other process is runnable.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import torch

from zycompile.tuning.candidates import DEFAULT, Candidate
from zycompile.tuning.shapes import GemmShape


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    rotate_bytes: int = 64 << 20
    max_sets: int = 64  # a 576 x 576 fp32 weight needs 49 sets to span 64 MiB
    budget_s: float = 0.02  # per candidate per round
    min_iters: int = 5
    max_iters: int = 50
    rounds: int = 3
    attempts: int = 4  # re-measure (up to this many times) while rounds look disturbed
    noise_ratio: float = 1.5  # best round median above this x the fastest call: disturbed
    quiet_wait_s: float = 1.0  # before each round, wait this long at most for other processes to sleep
    warmup: int = 1  # passes over all buffer sets before timing


DEFAULT_BENCH = BenchConfig()


@dataclasses.dataclass
class Timing:
    candidate: str
    ms: float | None  # None: discarded (``error`` says why)
    error: str = ""


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def make_buffers(shape: GemmShape, weight: torch.Tensor | None, cfg: BenchConfig, device="cpu"):
    """Buffer sets (x, w, b) for ``shape``; w in the shape's layout (a copy of ``weight`` if given)."""
    dtype = getattr(torch, shape.dtype)
    per_set = (shape.m * shape.k + shape.n * shape.k + shape.m * shape.n) * torch.finfo(dtype).bits // 8
    sets = max(2, min(cfg.max_sets, -(-cfg.rotate_bytes // per_set)))
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for i in range(sets):
        if weight is not None and i == 0:
            w = weight.detach().to(device=device, dtype=dtype)
        else:
            w = torch.randn(shape.n, shape.k, generator=gen, device=device).to(dtype) / shape.k**0.5
        if shape.layout == "kmajor":
            w = w.t().contiguous().t()
        else:
            w = w.contiguous()
        x = torch.randn(shape.m, shape.k, generator=gen, device=device).to(dtype)
        b = torch.randn(shape.n, generator=gen, device=device).to(dtype) if shape.bias else None
        out.append((x, w, b))
    return out


def _check(cand: Candidate, states, buffers, ref: torch.Tensor, dtype) -> str:
    x, _, b = buffers[0]
    got = cand.run(x, states[0], b)
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"wrong result shape/dtype {tuple(got.shape)} {got.dtype}"
    scale = max(1.0, ref.abs().max().item())
    err = (got.float() - ref.float()).abs().max().item()
    if not err <= tolerance(dtype) * scale:  # also catches NaN
        return f"differs from the default by {err:.2e} (max |ref| {scale:.2e})"
    return ""


ROUNDS = {"all": 0, "quiet": 0}  # rounds timed, and how many started on a quiet machine (for reports)


def others_running() -> int:
    """Runnable threads on this machine that are not ours (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/stat") as f:
            running = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
        ours = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                ours += f.read().rsplit(")", 1)[1].split()[0] == "R"
        return max(0, running - ours)
    except (OSError, StopIteration, ValueError, IndexError):
        return 0


def wait_quiet(max_s: float) -> bool:
    """Wait (up to ``max_s``) until no other thread wants a CPU; a stolen core stalls every OpenMP region."""
    end = time.perf_counter() + max_s
    while others_running() > 0:
        if time.perf_counter() > end:
            return False
        time.sleep(0.005)
    return True


def sync(x: torch.Tensor) -> None:
    """GPU kernels are asynchronous: time a call from an idle device to its finished result."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def graph_calls(c: Candidate, m: int, device, buffers, states) -> list[Callable[[], torch.Tensor]]:
    """One call per buffer set, made as a compiled graph calls candidate ``c`` at ``m`` rows on ``device``."""
    from zycompile.ops.cpu_kernels import SMALL_GEMM_OPS, SMALL_LINEAR_MAX_M

    direct = c.name == DEFAULT or (c.name in SMALL_GEMM_OPS and m <= SMALL_LINEAR_MAX_M)
    if direct or torch.device(device).type != "cpu":  # (GPU dispatch hides behind the kernel's queue)
        return [lambda x=x, s=s, b=b: c.run(x, s, b) for (x, _, b), s in zip(buffers, states)]
    from zycompile.ops import tuned_linear as tl

    calls = []
    for (x, w, b), s in zip(buffers, states):
        # A plan of its own per candidate and set (ids above the 2**56 of real plans): candidates are
        # timed interleaved, so a plan shared by the weight would run whichever was registered last.
        pid = _TIMING_PLAN_BASE + len(_TIMING_PLANS)
        plan = tl.Plan(w)
        plan.table[m] = c.name
        plan.adopt(c, w, m, s)
        tl.PLANS[pid] = plan
        _TIMING_PLANS.append(pid)
        calls.append(lambda x=x, w=w, b=b, pid=pid: tl.tuned_linear(x, w, b, pid))
    return calls


_TIMING_PLAN_BASE = 1 << 56
_TIMING_PLANS: list[int] = []


def release_plans() -> None:
    """Drop the op plans ``graph_calls`` made (and the prepacked copies they hold)."""
    from zycompile.ops import tuned_linear as tl

    for pid in _TIMING_PLANS:
        tl.PLANS.pop(pid, None)
    _TIMING_PLANS.clear()


def _round(calls: list[Callable[[], torch.Tensor]], buffers, cfg: BenchConfig) -> tuple[float, float]:
    """One round: (median, fastest) call time in ms, rotating over the buffer sets."""
    ROUNDS["all"] += 1
    ROUNDS["quiet"] += wait_quiet(cfg.quiet_wait_s)
    times: list[float] = []
    i, end = 0, time.perf_counter() + cfg.budget_s
    while len(times) < cfg.max_iters and (len(times) < cfg.min_iters or time.perf_counter() < end):
        x = buffers[i % len(buffers)][0]
        sync(x)
        t0 = time.perf_counter()
        calls[i % len(buffers)]()
        sync(x)
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times) * 1e3, min(times) * 1e3


def time_candidates(
    shape: GemmShape, cands: list[Candidate], cfg: BenchConfig = DEFAULT_BENCH, weight=None, device="cpu"
) -> list[Timing]:
    """Median-of-round times (ms) for each candidate on ``shape``; the default is ``cands[0]``."""
    if not cands or cands[0].name != DEFAULT:
        raise ValueError("the default candidate must come first")
    dtype = getattr(torch, shape.dtype)
    buffers = make_buffers(shape, weight, cfg, device)
    ref = cands[0].run(buffers[0][0], buffers[0][1], buffers[0][2])
    live: dict[str, list[Callable[[], torch.Tensor]]] = {}
    out: dict[str, Timing] = {}
    for c in cands:
        try:
            states = [c.prepare(w, shape.m) for _, w, _ in buffers]
            err = _check(c, states, buffers, ref, dtype)
        except Exception as e:  # a candidate this build or shape cannot run is discarded, not fatal
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if err:
            out[c.name] = Timing(c.name, None, err)
            continue
        live[c.name] = calls = graph_calls(c, shape.m, device, buffers, states)
        for _ in range(cfg.warmup):
            for call in calls:
                call()
    try:
        best: dict[str, float] = {}
        for _attempt in range(cfg.attempts):
            floor: dict[str, float] = {}
            for _ in range(cfg.rounds):
                for name, calls in live.items():
                    med, low = _round(calls, buffers, cfg)
                    best[name] = min(best.get(name, float("inf")), med)
                    floor[name] = min(floor.get(name, float("inf")), low)
            # Every round of some candidate far above its fastest call: the machine was busy throughout
            # (another process stalls an OpenMP region for a scheduler tick); measure again.
            if all(best[n] <= cfg.noise_ratio * floor[n] for n in live):
                break
    finally:
        release_plans()
    for name in live:
        out[name] = Timing(name, best[name])
    return [out[c.name] for c in cands]
