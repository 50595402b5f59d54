"""Hand a database's TunableOp solutions (imported hipBLASLt/rocBLAS winners) back to PyTorch's TunableOp.

A ``Gemm_Hipblaslt_<id>`` winner names a kernel only ROCm's TunableOp can run; zycompile has no
candidate for it. On ROCm, ``tuned_gemm`` writes those entries as a TunableOp results file next to the
user's tuning cache and turns TunableOp on in lookup mode (tuning off): every matching ``aten`` GEMM
then runs the recorded solution, and shapes not in the file keep hipBLASLt's default.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zycompile.tuning import db as tdb


def solutions(db: tdb.TuningDB) -> dict:
    """The entries whose winner is a TunableOp solution (not a zycompile candidate)."""
    return {s: e for s, e in db.entries.items() if e.winner.startswith("Gemm_")}


def hand_back(db: tdb.TuningDB, device: torch.device, tunable=None, path: Path | None = None) -> str | None:
    """Give ``db``'s TunableOp solutions to TunableOp; a note saying what was done (None: nothing to do).
    ``path``: the results file to write (default: beside the device's tuning database)."""
    picked = solutions(db)
    if not picked:
        return None
    if device.type != "cuda" or torch.version.hip is None:
        return f"{len(picked)} TunableOp solution(s) in the database need ROCm's TunableOp; default kept"
    tunable = tunable or torch.cuda.tunable
    only = tdb.TuningDB(db.validators, margin=db.margin, source=db.source)
    only.entries = picked
    path = Path(path or tdb.default_path(device).with_suffix(".tunableop.csv"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tdb.export_tunableop_csv(only, path)
    tunable.enable(True)
    tunable.tuning_enable(False)  # look up the recorded solutions; never tune while serving
    if not tunable.read_file(str(path)):
        return f"TunableOp could not read {path}; hipBLASLt defaults kept"
    return f"{len(picked)} TunableOp solution(s) handed to TunableOp ({path})"
