"""``zycompile tune``: collect a recipe's GEMM shapes, time every candidate, write the winners.

A candidate wins a shape only if it beats the default by the database's ``margin`` (default 3%):
within the noise, the default is kept, so a tuned model is never slower by the tuner's choice.
An existing database at the output path (same device and versions) is updated, not replaced, so
several recipes can share one per-device file.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from zycompile.errors import ZyError
from zycompile.tuning import db as tdb
from zycompile.tuning.bench import DEFAULT_BENCH, BenchConfig, time_candidates
from zycompile.tuning.candidates import CANDIDATES, DEFAULT, available
from zycompile.tuning.shapes import GemmShape, collect, decomposed_by_inductor


@dataclasses.dataclass
class Row:
    shape: GemmShape
    default_ms: float
    winner: str
    best_ms: float
    best_candidate: str  # fastest valid candidate, even if it did not clear the margin

    @property
    def speedup(self) -> float:
        """Tuned (the winner) over default: 1.0 where the default is kept."""
        return self.default_ms / self.best_ms if self.winner != DEFAULT else 1.0


def tune_shapes(
    shapes: list[GemmShape],
    db: tdb.TuningDB,
    cfg: BenchConfig | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    device: torch.device | str = "cpu",
    skip: tuple[str, ...] = (),
    save: Callable[[], None] | None = None,
    include: tuple[str, ...] = (),
) -> list[Row]:
    """Time every available candidate (less ``skip``; opt-in ones only if in ``include``) on each
    shape; record the winners in ``db``, calling ``save`` after each shape (a run killed part way keeps
    what it measured)."""
    cfg = cfg or DEFAULT_BENCH
    device = torch.device(device)
    rows = []
    for i, shape in enumerate(shapes):
        if progress:
            progress(i, len(shapes), shape.label())
        cands = [
            c
            for c in available(device, getattr(torch, shape.dtype))
            if c.name not in skip and (not c.opt_in or c.name in include)
        ]
        timings = {t.candidate: t for t in time_candidates(shape, cands, cfg, device=device)}
        default_ms = timings[DEFAULT].ms
        valid = {n: t.ms for n, t in timings.items() if t.ms is not None}
        best = min(valid, key=valid.get)
        winner = best if default_ms / valid[best] >= db.margin else DEFAULT
        db.entries[shape] = tdb.Entry(winner, {n: t.ms for n, t in timings.items()})
        rows.append(Row(shape, default_ms, winner, valid[winner], best))
        if save:
            save()
    if progress:
        progress(len(shapes), len(shapes), "done")
    return rows


def open_db(out: Path, device, margin: float = 1.03) -> tdb.TuningDB:
    """The database at ``out`` to update (checked against this machine), or a new one."""
    validators = tdb.current_validators(device)
    if out.exists():
        db = tdb.TuningDB.load(out)
        db.check(validators)
        return db
    return tdb.TuningDB(validators, margin=margin, source=str(out))


def tune(
    recipe,
    out: str | Path | None = None,
    cfg: BenchConfig | None = None,
    model: torch.nn.Module | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    log: Callable[[str], None] | None = None,
    skip: tuple[str, ...] = (),
    extra_m: tuple[int, ...] = (),
    new_only: bool = False,
    include: tuple[str, ...] = (),
) -> tuple[tdb.TuningDB, list[Row]]:
    """Tune every GEMM of ``recipe`` (a Recipe); save to ``out`` (default: the ``db: auto`` path).
    ``skip``: candidate names not to time. ``include``: opt-in candidates to time too (``inductor_cpp``).
    ``extra_m``: row counts to tune for every weight besides the buckets' (speculative verify widths).
    ``new_only``: time only the shapes the database does not hold yet."""
    bad = [m for m in extra_m if m < 1]
    if bad:
        raise ZyError(f"--m {bad[0]}: expected row counts >= 1")
    others = ", ".join(n for n in CANDIDATES if n != DEFAULT)
    for name in skip:
        if name not in CANDIDATES or name == DEFAULT:
            why = "the default cannot be skipped" if name == DEFAULT else "no such candidate"
            raise ZyError(f"--skip {name}: {why}; candidates: {others}")
    opt_in = [n for n, c in CANDIDATES.items() if c.opt_in]
    for name in include:
        if name not in opt_in:
            why = "no such candidate" if name not in CANDIDATES else "it is timed anyway"
            raise ZyError(f"--include {name}: {why}; opt-in candidates: {', '.join(opt_in)}")
    if model is None:
        from zycompile.models import load_model

        model = load_model(recipe.model.source, recipe.model.dtype).model
    device = next(model.parameters()).device
    out = Path(out) if out else tdb.default_path(device)
    db = open_db(out, device)
    shapes = collect(recipe, model, progress=log, extra_m=tuple(extra_m))
    left = [s for s in shapes if decomposed_by_inductor(recipe.lowering, s)]
    shapes = [s for s in shapes if s not in left]
    if log and left:
        log(f"{len(left)} M=1 GEMM shape(s) left to Inductor's decompose_mm_pass (not tuned)")
    if new_only:
        held = [s for s in shapes if db.lookup(s) is not None]
        shapes = [s for s in shapes if db.lookup(s) is None]
        if log:
            log(f"{len(held)} shape(s) already in {out}, {len(shapes)} to time")
    rows = tune_shapes(shapes, db, cfg, progress, device, skip, save=lambda: db.save(out), include=include)
    db.save(out)
    return db, rows


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summary_lines(rows: list[Row]) -> list[str]:
    """Markdown table: shape, default time, winner, tuned time, speedup; then geomean and min."""
    lines = [
        "| shape (M x N x K, weight layout) | default (ms) | best candidate | tuned (ms) | speedup |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.shape
        note = "" if r.winner != DEFAULT or r.best_candidate == DEFAULT else f" ({r.best_candidate} < margin)"
        lines.append(
            f"| {s.m} x {s.n} x {s.k} {s.dtype} {s.layout}{' +bias' if s.bias else ''} | {r.default_ms:.3f} "
            f"| {r.winner}{note} | {r.best_ms if r.winner != DEFAULT else r.default_ms:.3f} | {r.speedup:.2f}x |"
        )
    sp = [r.speedup for r in rows]
    if sp:
        lines += ["", f"geometric-mean speedup {geomean(sp):.2f}x over {len(sp)} shapes; min {min(sp):.2f}x"]
    return lines


def progress_bar(stream=None) -> Callable[[int, int, str], None]:
    def show(i: int, n: int, label: str) -> None:
        out = stream or sys.stderr
        width = 30
        filled = width * i // max(n, 1)
        end = "\n" if i >= n else ""
        lead = "\r" if out.isatty() else ""
        if lead or i >= n or i % 8 == 0:
            print(
                f"{lead}[{'#' * filled}{'.' * (width - filled)}] {i}/{n} {label:40.40s}",
                end=end or ("" if lead else "\n"),
                file=out,
                flush=True,
            )

    return show
