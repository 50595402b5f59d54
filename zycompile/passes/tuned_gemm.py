"""Swap each GEMM for the winner a tuning database recorded for its shape (``zycompile tune``).

Before::

    linear = linear(x, _zy_fused_0, None)                       # x: [4, 1, 576], weight K-major

After (the database says oneDNN on a prepacked weight wins at M=4)::

    linear = zycompile.tuned_linear.default(x, _zy_fused_0, None, 17)   # 17: this weight's plan

The plan (``zycompile/ops/tuned_linear.py``) maps M to a candidate and holds the candidate's state: a
prepacked oneDNN copy of the weight is a second copy of it, counted in the notes (``extra weight
memory``). A static graph is swapped where its exact M is in the database and the winner beat the
default; a static M the database lacks (a speculative verify width k + 1 no bucket runs) takes the
fastest candidate that serves any M at the nearest tuned M of that weight, within 2x (noted); a
symbolic-length prefill graph uses the nearest tuned M of that weight at run time.
``weight_copies: false`` limits the choice to candidates that keep one copy (e.g. oneDNN on the plain
weight). Weights not in the database keep the default and are counted ("not in database"). M = 1
GEMMs that Inductor's ``decompose_mm_pass`` turns into fused reductions are left to it.

``db: auto`` reads $ZYCOMPILE_CACHE/tuning/<device>.yaml, else the database shipped in
``zycompile/tuning/shipped/`` for this device if its validators match (no file: every GEMM keeps the
default, with a warning); ``db: <path>`` a given file. A file made on another device or software version is an error
(raised by ``prepare``, before tracing), never silently used. Winners that are TunableOp solutions
(a hipBLASLt result imported with ``import_tunableop_csv``) are handed to TunableOp on ROCm
(``tuning/tunableop.py``), noted elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
import torch.fx

from zycompile.errors import TuningDBError
from zycompile.ops import cpu_kernels
from zycompile.ops.cpu_kernels import SMALL_GEMM_OPS
from zycompile.ops.tuned_linear import PLANS, plan_for
from zycompile.passes import register_pass
from zycompile.passes.base import GraphPass, PassResult
from zycompile.passes.fx_util import propagate_meta
from zycompile.tuning import db as tdb
from zycompile.tuning import tunableop
from zycompile.tuning.candidates import CANDIDATES, DEFAULT, state_key
from zycompile.tuning.shapes import decomposed_by_inductor, gemm_sites

log = logging.getLogger("zycompile")
TUNED_LINEAR = torch.ops.zycompile.tuned_linear.default
_LOADED: dict[tuple[str, float], tdb.TuningDB] = {}
_HANDED: dict[str, str | None] = {}  # database file -> what hand_back did with its TunableOp solutions
_SKIPPED: set[tuple[str, float]] = set()  # shipped files whose validators do not match this machine
NEAREST_RATIO = 2.0  # an untuned static M borrows a tuned M's choice at most this far off


def resolve_db(opts, device: torch.device) -> tdb.TuningDB | None:
    """The checked database for ``opts.db`` on ``device``; None when ``auto`` finds no usable file."""
    if opts.db == "auto":
        path = tdb.default_path(device)
        if not path.exists():
            return _shipped_db(device)
    else:
        path = Path(opts.db).expanduser()
        if not path.exists():
            raise TuningDBError(
                f"{path}: no tuning database (create it with `zycompile tune --recipe R --out {path}`)"
            )
    return _load_checked(path, device)


def _load_checked(path: Path, device: torch.device) -> tdb.TuningDB:
    key = (str(path), path.stat().st_mtime)
    if key not in _LOADED:
        db = tdb.TuningDB.load(path)
        db.check(tdb.current_validators(device))
        _LOADED[key] = db
    return _LOADED[key]


def _shipped_db(device: torch.device) -> tdb.TuningDB | None:
    """The database shipped for this device, if its validators match this machine (else skipped)."""
    path = tdb.shipped_path(device)
    if not path.exists():
        return None
    key = (str(path), path.stat().st_mtime)
    if key in _SKIPPED:  # checked once per file version, not once per compiled graph
        return None
    try:
        return _load_checked(path, device)
    except TuningDBError as e:
        log.info("shipped tuning database not used: %s", e)
        _SKIPPED.add(key)
        return None


def db_missing_note(device: torch.device) -> str:
    return (
        f"no tuning database at {tdb.default_path(device)} (and none shipped for this device and software): "
        "every GEMM keeps the default; run `zycompile tune --recipe R` to make one"
    )


@register_pass
class TunedGemmPass(GraphPass):
    name = "tuned_gemm"
    stage = "pre_grad"
    # Keeping the default everywhere is a valid outcome (it was fastest); no-database and
    # not-in-database counts are logged as a warning and kept in the notes instead.
    expect_matches = False
    export_note = (
        "zycompile::tuned_linear reads weight plans (prepacked copies) kept in this process, "
        "which a package cannot carry; its GEMMs keep Inductor's default"
    )

    @dataclasses.dataclass(frozen=True)
    class Options:
        db: str = "auto"  # "auto" ($ZYCOMPILE_CACHE/tuning/<device>.yaml) or a path
        min_speedup: float = 1.0  # use a winner only if it beat the default by this (on top of the db margin)
        min_m: int = 1  # leave GEMMs with fewer rows than this (e.g. 2: batch-1 decode GEMVs) to the default
        weight_copies: bool = True  # false: only candidates that keep one copy of the weights (no prepacking)

        def check(self):
            if self.min_m < 1:
                yield "min_m", f"got {self.min_m!r}; expected an integer >= 1"
            if self.min_speedup < 1.0:
                yield "min_speedup", f"got {self.min_speedup!r}; expected a number >= 1.0"
            if not self.db:
                yield "db", "got an empty string; expected 'auto' or a path"

    @staticmethod
    def prepare(model: torch.nn.Module, opts) -> None:
        # Reject a bad or foreign database here, with its own message, rather than deep inside tracing.
        param = next(model.parameters(), None)
        resolve_db(opts, param.device if param is not None else torch.device("cpu"))

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        sites = gemm_sites(gm, self.ctx.example_inputs)
        device = next((s.weight.device for s in sites if s.weight is not None), torch.device("cpu"))
        db = resolve_db(self.opts, device)
        notes: list[str] = []
        if db is None:
            notes.append(db_missing_note(device))
        counts = dict(
            swapped=0,
            default_fastest=0,
            not_in_db=0,
            below_min_m=0,
            decompose_mm=0,
            untunable=0,
            left_to_small_gemm=0,
        )
        self.nearest: list[str] = []
        used: dict[str, int] = {}
        missing: set[str] = set()
        extra, panel = 0, {}
        for site in sites:
            shape = site.shape
            if shape is None:
                counts["untunable"] += 1
                notes.append(f"{site.node.name}: {site.reason}; default kept")
                continue
            if site.m is not None and site.m < self.opts.min_m:
                counts["below_min_m"] += 1
                continue
            if decomposed_by_inductor(self.ctx.recipe.lowering, shape):
                counts["decompose_mm"] += 1
                continue
            table = self._table(db, shape, site.m)
            if not table:
                counts["not_in_db"] += 1
                missing.add(
                    shape.label() if site.m is not None else shape.label().replace("M=0", "M=dynamic")
                )
                continue
            if all(name == DEFAULT for name in table.values()):
                counts["default_fastest"] += 1
                continue
            if set(table.values()) <= set(SMALL_GEMM_OPS) and self._small_gemm_takes(site.m, shape.dtype):
                # a small-GEMM kernel won: small_gemm's own kernel serves it, without our dispatch op
                counts["left_to_small_gemm"] += 1
                continue
            pid = plan_for(site.weight)
            plan = PLANS[pid]
            plan.table.update(table)
            for m, name in table.items():
                cand = CANDIDATES[name]
                fresh = state_key(cand, m) not in plan.states
                plan.state(cand, site.weight, m)  # build prepacked copies now, not in the first step
                if fresh and cand.copies_weight:
                    nbytes = site.weight.numel() * site.weight.element_size()
                    if name in SMALL_GEMM_OPS:  # the op's own copy, one per weight for every graph
                        panel[pid] = nbytes
                    else:
                        extra += nbytes
                used[name] = used.get(name, 0) + 1
            self._swap(gm, site.node, pid)
            counts["swapped"] += 1
        if counts["swapped"]:
            gm.graph.lint()
            gm.recompile()
        summary = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items() if v)
        notes.insert(0, f"GEMMs: {summary or 'none'}")
        if used:
            notes.insert(1, "candidates: " + ", ".join(f"{k} x{v}" for k, v in sorted(used.items())))
        if extra:
            notes.insert(2, f"extra weight memory (prepacked/re-laid copies): {extra / 1e6:.1f} MB")
        if panel:
            notes.append(
                f"panel-packed weight copies: {sum(panel.values()) / 1e6:.1f} MB (made on the first call; "
                "one per weight, shared with small_gemm's; fp32 weights that are GGUF block codes keep codes, "
                "a fifth to a third of that)"
            )
        if missing:
            notes.append("not in database: " + "; ".join(sorted(missing)[:8]))
        if self.nearest:
            notes.append("untuned M, nearest tuned M's any-M winner: " + "; ".join(sorted(self.nearest)[:8]))
        if db is not None:
            notes.append(f"database: {db.source}")
            if db.source not in _HANDED:  # once per file and process: TunableOp's table is global
                _HANDED[db.source] = tunableop.hand_back(db, device)
            if _HANDED[db.source]:
                notes.append(_HANDED[db.source])
        self.ctx.state.setdefault("tuned_gemm", []).append(counts)
        if db is None or (counts["not_in_db"] and not counts["swapped"]):
            log.warning("tuned_gemm: graph %d: %s", self.ctx.graph_index, "; ".join(notes[:2]))
        return PassResult(modified=counts["swapped"] > 0, matches=counts["swapped"], notes=notes)

    def _small_gemm_takes(self, m: int | None, dtype: str) -> bool:
        """Whether the recipe's ``small_gemm`` (later in the graph) writes this static M and dtype as one
        of its C++ kernels (the one its ``kernel`` option names)."""
        spec = next((p for p in self.ctx.recipe.passes if p.name == "small_gemm"), None)
        op = cpu_kernels.SMALL_GEMM_KERNEL_OPS.get(spec.options.kernel) if spec is not None else None
        return (
            op is not None
            and m is not None
            and m <= spec.options.max_m
            and getattr(torch, dtype) in cpu_kernels.SMALL_GEMM_DTYPES[op]
        )

    def _table(self, db, shape, m) -> dict[int, str]:
        """M -> candidate for this site (empty: not in the database)."""
        if db is None:
            return {}
        dtype = getattr(torch, shape.dtype)
        if m is not None and db.lookup(shape) is None:
            near = self._nearest(db, shape, m)
            if near is None:
                return {}
            # This M was never timed (a verify width k + 1 no bucket runs): the nearest tuned M's
            # fastest candidate that serves any M, which beats leaving the GEMM to the default.
            self.nearest.append(f"M={m} N={shape.n} K={shape.k} from M={near}")
            near_entry = db.lookup(dataclasses.replace(shape, m=near))
            return {m: self._choose(near_entry, db.margin, dtype, dynamic=False, borrowed=True)}
        entries = (
            {m: db.lookup(shape)}
            if m is not None
            else {k: e for k, e in db.family(shape).items() if k > 1}  # a prefill graph has M >= 2
        )
        entries = {k: e for k, e in entries.items() if k >= self.opts.min_m}
        return {k: self._choose(e, db.margin, dtype, m is None) for k, e in entries.items() if e is not None}

    def _nearest(self, db, shape, m: int) -> int | None:
        """The tuned M of this weight closest to ``m`` in ratio (ties: the larger), at least ``min_m``
        and within ``NEAREST_RATIO`` of it: farther off, the timing says little about this M."""
        ms = [k for k in db.family(shape) if k >= self.opts.min_m and max(k / m, m / k) <= NEAREST_RATIO]
        return min(ms, key=lambda k: (abs(math.log(k / m)), -k)) if ms else None

    def _choose(self, entry, margin: float, dtype: torch.dtype, dynamic: bool, borrowed: bool = False) -> str:
        """The database's winner, or with ``weight_copies: false`` the fastest candidate that keeps one
        copy of the weights; the default unless it beat it by the margin (and ``min_speedup``). A
        symbolic-M graph, or a static M borrowing another M's timing, skips candidates compiled for one
        M (``inductor_cpp``): they would rarely run exactly that M, and would pay their compile time and
        packed copies for nothing. A symbolic-M graph also skips any candidate prepared per M: each new
        prompt length would prepare every weight again, and keep the copy (``mkl_packed`` is not one: a
        single packed copy serves every M), and candidates on threads of their own (``split_n``): timed
        alone they won at M = 1,024, inside the prefill graph they lost to the runner-up."""
        times = entry.times_ms
        base = times.get(DEFAULT)
        ranked = sorted((n for n, t in times.items() if t), key=lambda n: times[n])
        # a static M takes the winner, or the next fastest if the winner cannot run here (no compiler
        # for its kernel); the other cases pick among candidates the winner may not be
        names = ranked if dynamic or borrowed or not self.opts.weight_copies else [entry.winner, *ranked]
        for name in names:
            cand = CANDIDATES.get(name)  # None: e.g. a hipBLASLt solution, meaningless on CPU
            if cand is None or name == DEFAULT or (cand.copies_weight and not self.opts.weight_copies):
                continue
            if (dynamic or borrowed) and cand.exact_m or dynamic and (cand.per_m or cand.own_threads):
                continue
            speedup = base / times[name] if base and times.get(name) else 0.0
            if speedup >= max(margin, self.opts.min_speedup) and cand.available(torch.device("cpu"), dtype):
                return name
        return DEFAULT

    @staticmethod
    def _swap(gm: torch.fx.GraphModule, node: torch.fx.Node, pid: int) -> None:
        x = node.args[0]
        w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(TUNED_LINEAR, (x, w, b, pid))
        propagate_meta(new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
