"""The tuning database: one readable YAML file per device, keyed by GEMM shape.

::

    format: zycompile-gemm-tuning/1
    validators: {device: 'cpu: AMD EPYC', torch: 2.13.0+cpu, mkl: 2024.2, onednn: v3.12.0, threads: '2'}
    margin: 1.03
    entries:
    - {m: 4, n: 960, k: 576, dtype: float32, layout: kmajor, bias: false, winner: onednn_packed,
       times_ms: {aten: 0.275, onednn_packed: 0.094, ...}}

``winner`` is what the ``tuned_gemm`` pass uses; it is the default (``aten``) unless a candidate beat
it by ``margin``. A file whose validators differ from this machine's (another CPU or GPU, torch,
MKL/oneDNN or CUDA/ROCm version, thread count) is rejected with a message naming the difference,
never used. TunableOp's CSV (``Validator,...`` lines then ``GemmTunableOp_<dtype>_<TT>,...``) is
imported and exported, so ROCm users can bring hipBLASLt results and take ours to TunableOp.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from zycompile.errors import TuningDBError
from zycompile.tuning.candidates import DEFAULT
from zycompile.tuning.shapes import GemmShape

FORMAT = "zycompile-gemm-tuning/1"


def _config_version(pattern: str) -> str:
    m = re.search(pattern, torch.__config__.show())
    return m.group(1) if m else "none"


def current_validators(device: torch.device | str = "cpu") -> dict[str, str]:
    """What a tuning result depends on, for ``device``: hardware, torch and backend library versions."""
    device = torch.device(device)
    if device.type == "cpu":
        from zycompile.bench.machine import cpu_model

        return {
            "device": f"cpu: {cpu_model()}",
            "torch": str(torch.__version__),
            "mkl": _config_version(r"Math Kernel Library Version ([\w.]+)"),
            "onednn": _config_version(r"MKL-DNN (v[\w.]+)"),
            "threads": str(torch.get_num_threads()),
        }
    props = torch.cuda.get_device_properties(device)
    return {
        "device": f"{device.type}: {torch.cuda.get_device_name(device)}",
        "arch": str(getattr(props, "gcnArchName", f"sm_{props.major}{props.minor}")),
        "torch": str(torch.__version__),
        "cuda": str(torch.version.cuda),
        "hip": str(torch.version.hip),
    }


def device_key(validators: dict[str, str]) -> str:
    """A file name for a device: ``cpu-amd-epyc-2t``, ``cuda-nvidia-h100-80gb-hbm3``."""
    slug = re.sub(r"[^a-z0-9]+", "-", validators["device"].lower()).strip("-")
    return f"{slug}-{validators['threads']}t" if "threads" in validators else slug


def cache_dir() -> Path:
    return Path(os.environ.get("ZYCOMPILE_CACHE") or "~/.cache/zycompile").expanduser() / "tuning"


def default_path(device: torch.device | str = "cpu") -> Path:
    """Where ``db: auto`` looks first (and ``zycompile tune`` writes): $ZYCOMPILE_CACHE/tuning/<key>.yaml."""
    return cache_dir() / f"{device_key(current_validators(device))}.yaml"


# Databases tuned by us on the machines we run (like vLLM's per-GPU kernel configs), used by
# ``db: auto`` when the user has not tuned this device; a file whose validators (torch, MKL/oneDNN,
# threads) differ from this machine's is skipped there, never used.
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def shipped_path(device: torch.device | str = "cpu") -> Path:
    return SHIPPED_DIR / f"{device_key(current_validators(device))}.yaml"


@dataclasses.dataclass
class Entry:
    winner: str
    times_ms: dict[str, float | None] = dataclasses.field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        d, w = self.times_ms.get(DEFAULT), self.times_ms.get(self.winner)
        return d / w if d and w else None


@dataclasses.dataclass
class TuningDB:
    validators: dict[str, str]
    entries: dict[GemmShape, Entry] = dataclasses.field(default_factory=dict)
    margin: float = 1.03
    source: str = "<memory>"

    def lookup(self, shape: GemmShape) -> Entry | None:
        return self.entries.get(shape)

    def family(self, shape: GemmShape) -> dict[int, Entry]:
        """Entries for every M of this (N, K, dtype, layout, bias)."""
        fam = shape.family()
        return {s.m: e for s, e in self.entries.items() if s.family() == fam}

    def check(self, validators: dict[str, str]) -> None:
        """Raise TuningDBError unless this file was made with exactly ``validators``."""
        diffs = [
            f"{k}: file has {self.validators.get(k, '<missing>')!r}, this machine {v!r}"
            for k, v in validators.items()
            if str(self.validators.get(k)) != str(v)
        ]
        if diffs:
            raise TuningDBError(
                f"{self.source}: tuning database rejected, it was made on another device or software "
                f"version ({'; '.join(diffs)}); re-run `zycompile tune` on this machine"
            )

    # ---- file I/O --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for s, e in sorted(self.entries.items()):
            row = dataclasses.asdict(s)
            row = {k: row[k] for k in ("m", "n", "k", "dtype", "layout", "bias")}
            row["winner"] = e.winner
            row["times_ms"] = {k: (None if v is None else round(v, 4)) for k, v in e.times_ms.items()}
            rows.append(row)
        return {
            "format": FORMAT,
            "validators": {k: str(v) for k, v in self.validators.items()},
            "margin": self.margin,
            "entries": rows,
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(
            "# zycompile GEMM tuning database (zycompile tune); edit with care\n"
            + yaml.safe_dump(self.to_dict(), sort_keys=False, width=120, default_flow_style=None)
        )
        tmp.replace(path)  # never leave a half-written database behind
        self.source = str(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TuningDB:
        path = Path(path)
        if not path.exists():
            raise TuningDBError(f"{path}: no tuning database (create it with `zycompile tune --recipe R`)")
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise TuningDBError(f"{path}: cannot read tuning database ({e})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f" at line {mark.line + 1}" if mark else ""
            raise TuningDBError(f"{path}: corrupted tuning database: malformed YAML{loc}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> TuningDB:
        def bad(where: str, what: str):
            raise TuningDBError(f"{source}: corrupted tuning database: {where}: {what}")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            bad("format", f"expected {FORMAT!r} (is this a zycompile tuning database?)")
        validators = data.get("validators")
        if not isinstance(validators, dict) or "device" not in validators:
            bad("validators", "expected a mapping with at least 'device'")
        margin = data.get("margin", 1.03)
        if not isinstance(margin, (int, float)) or margin < 1:
            bad("margin", f"got {margin!r}; expected a number >= 1")
        rows = data.get("entries")
        if not isinstance(rows, list):
            bad("entries", "expected a list")
        entries = {}
        for i, row in enumerate(rows):
            where = f"entries[{i}]"
            if not isinstance(row, dict):
                bad(where, f"expected a mapping, got {type(row).__name__}")
            for key, typ in (("m", int), ("n", int), ("k", int), ("dtype", str), ("layout", str)):
                if not isinstance(row.get(key), typ) or isinstance(row.get(key), bool):
                    bad(f"{where}.{key}", f"got {row.get(key)!r}; expected {typ.__name__}")
            if row["layout"] not in ("row", "kmajor") or not hasattr(torch, row["dtype"]):
                bad(where, f"unknown layout {row['layout']!r} or dtype {row['dtype']!r}")
            if not isinstance(row.get("winner"), str):
                bad(f"{where}.winner", f"got {row.get('winner')!r}; expected a candidate name")
            times = row.get("times_ms") or {}
            if not isinstance(times, dict) or not all(
                v is None or isinstance(v, (int, float)) for v in times.values()
            ):
                bad(f"{where}.times_ms", "expected a mapping of candidate -> milliseconds")
            shape = GemmShape(
                row["n"], row["k"], row["m"], row["dtype"], row["layout"], bool(row.get("bias"))
            )
            entries[shape] = Entry(row["winner"], dict(times))
        return cls({str(k): str(v) for k, v in validators.items()}, entries, float(margin), source)


def load_checked(path: str | os.PathLike, device: torch.device | str = "cpu") -> TuningDB:
    db = TuningDB.load(path)
    db.check(current_validators(device))
    return db


# ---- TunableOp CSV -------------------------------------------------------------------------------
# TunableOp speaks BLAS (column-major): torch.mm(A [m, k], B [k, n]) is recorded as
# ``GemmTunableOp_<dtype>_<transB><transA>,<tb><ta>_<n>_<m>_<k>_ld_<ldb>_<lda>_<ldc>,<solution>,<ms>``.
# A linear x @ w.T reads B = w.T: transposed ('T') for a row-major weight, not ('N') for K-major.

_TO_TUNABLEOP = {"float32": "float", "float64": "double", "float16": "Half", "bfloat16": "BFloat16"}
_FROM_TUNABLEOP = {v: k for k, v in _TO_TUNABLEOP.items()}


def export_tunableop_csv(db: TuningDB, path: str | os.PathLike) -> Path:
    """Write ``db`` as a TunableOp results file; our CPU candidates are written as ``Default``."""
    lines = [f"Validator,PT_VERSION,{db.validators.get('torch', torch.__version__).split('+')[0]}"]
    for key in ("rocm", "hipblaslt", "rocblas"):
        if f"tunableop.{key}" in db.validators:
            lines.append(f"Validator,{key.upper()}_VERSION,{db.validators[f'tunableop.{key}']}")
    for s, e in sorted(db.entries.items()):
        if s.dtype not in _TO_TUNABLEOP or s.bias:
            continue  # TunableOp tunes plain GEMMs; a bias is a separate epilogue there
        tb = "T" if s.layout == "row" else "N"
        ldb = s.k if s.layout == "row" else s.n
        params = f"{tb.lower()}n_{s.n}_{s.m}_{s.k}_ld_{ldb}_{s.k}_{s.n}"
        solution = e.winner if e.winner.startswith(("Gemm_", "Default")) else "Default"
        ms = e.times_ms.get(e.winner)
        lines.append(f"GemmTunableOp_{_TO_TUNABLEOP[s.dtype]}_{tb}N,{params},{solution},{ms or 0:.4f}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def import_tunableop_csv(path: str | os.PathLike, validators: dict[str, str] | None = None) -> TuningDB:
    """Read a TunableOp results file: GEMM entries keep their solution names (e.g. Gemm_Hipblaslt_1219)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TuningDBError(f"{path}: cannot read TunableOp file ({e.strerror})") from None
    vals: dict[str, str] = dict(validators or {})
    db = TuningDB(vals, source=str(path))
    for line in text.splitlines():
        if not line.strip():
            continue
        f = line.strip().split(",")
        if f[0] == "Validator" and len(f) >= 3:
            name = f[1].lower().removesuffix("_version")
            vals["torch" if name == "pt" else f"tunableop.{name}"] = ",".join(f[2:])
            continue
        m = re.fullmatch(r"GemmTunableOp_(\w+?)_([NT])([NT])", f[0])
        p = re.fullmatch(r"[nt][nt]_(\d+)_(\d+)_(\d+)(?:_ld_\d+_\d+_\d+)?", f[1]) if len(f) >= 3 else None
        if not m or not p:
            continue  # other TunableOps (batched, scaled) have no zycompile counterpart
        if m.group(1) not in _FROM_TUNABLEOP or m.group(3) != "N":
            continue  # a transposed activation is not a linear's x
        n, mm, k = (int(g) for g in p.groups())
        layout = "row" if m.group(2) == "T" else "kmajor"
        time_ms = float(f[3]) if len(f) > 3 and f[3] else None
        shape = GemmShape(n, k, mm, _FROM_TUNABLEOP[m.group(1)], layout, False)
        db.entries[shape] = Entry(f[2], {f[2]: time_ms})
    if "torch" not in vals:
        raise TuningDBError(f"{path}: not a TunableOp results file (no 'Validator,PT_VERSION,...' line)")
    vals.setdefault("device", "unknown (TunableOp file)")
    return db
