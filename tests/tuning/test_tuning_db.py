"""The tuning database: round trip, validators, corrupted files, TunableOp CSV import/export."""

from __future__ import annotations

import pytest

from zycompile.errors import TuningDBError
from zycompile.tuning import db as tdb
from zycompile.tuning.shapes import GemmShape

S4 = GemmShape(960, 576, 4, "float32", "kmajor", False)
S64 = GemmShape(3072, 576, 64, "float32", "row", True)


def make_db() -> tdb.TuningDB:
    db = tdb.TuningDB(tdb.current_validators("cpu"))
    db.entries[S4] = tdb.Entry("onednn_packed", {"aten": 0.27, "onednn_packed": 0.09, "mkl_packed": None})
    db.entries[S64] = tdb.Entry("aten", {"aten": 1.2, "onednn": 1.19})
    return db


def test_round_trip_and_lookup(tmp_path):
    path = make_db().save(tmp_path / "db.yaml")
    text = path.read_text()
    assert "zycompile-gemm-tuning/1" in text and "onednn_packed" in text  # readable YAML
    db = tdb.load_checked(path)
    assert db.lookup(S4).winner == "onednn_packed"
    assert db.lookup(S4).speedup == pytest.approx(3.0)
    assert db.lookup(S4).times_ms["mkl_packed"] is None  # a discarded candidate stays recorded
    assert db.family(GemmShape(960, 576, 0, "float32", "kmajor", False)) == {4: db.lookup(S4)}
    assert db.lookup(GemmShape(960, 576, 8, "float32", "kmajor", False)) is None


@pytest.mark.parametrize("key", ["device", "torch", "onednn", "threads"])
def test_wrong_validator_is_rejected(tmp_path, key):
    db = make_db()
    db.validators[key] = "something else"
    path = db.save(tmp_path / "db.yaml")
    with pytest.raises(TuningDBError) as e:
        tdb.load_checked(path)
    msg = str(e.value)
    assert str(path) in msg and "rejected" in msg and key in msg and "something else" in msg
    assert tdb.current_validators("cpu")[key] in msg


@pytest.mark.parametrize(
    "text, where",
    [
        ("format: zycompile-gemm-tuning/1\nvalidators: {device: x\nentries: [", "malformed YAML"),
        ("\x00\x01garbage", "corrupted"),
        ("just a string", "format"),
        ("format: zycompile-gemm-tuning/1\nvalidators: {device: x}\nentries: {}\n", "entries"),
        (
            "format: zycompile-gemm-tuning/1\nvalidators: {device: x}\nentries:\n"
            "- {m: four, n: 1, k: 1, dtype: float32, layout: row, winner: aten}\n",
            "entries[0].m",
        ),
        (
            "format: zycompile-gemm-tuning/1\nvalidators: {device: x}\nentries:\n"
            "- {m: 4, n: 1, k: 1, dtype: float32, layout: diagonal, winner: aten}\n",
            "layout",
        ),
    ],
)
def test_corrupted_file_gives_a_clear_error(tmp_path, text, where):
    path = tmp_path / "db.yaml"
    path.write_text(text)
    with pytest.raises(TuningDBError) as e:
        tdb.TuningDB.load(path)
    assert str(path) in str(e.value) and where in str(e.value)


def test_truncated_file_is_an_error(tmp_path):
    path = make_db().save(tmp_path / "db.yaml")
    path.write_text(path.read_text()[: len(path.read_text()) // 2])
    with pytest.raises(TuningDBError, match="corrupted tuning database"):
        tdb.TuningDB.load(path)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(TuningDBError, match="zycompile tune"):
        tdb.TuningDB.load(tmp_path / "nope.yaml")


def test_default_path_is_per_device(monkeypatch, tmp_path):
    monkeypatch.setenv("ZYCOMPILE_CACHE", str(tmp_path))
    path = tdb.default_path("cpu")
    assert path.parent == tmp_path / "tuning" and path.suffix == ".yaml"
    assert path.stem.startswith("cpu-") and path.stem.endswith("t")


HIPBLASLT_CSV = """Validator,PT_VERSION,2.6.0
Validator,ROCM_VERSION,6.2.0.0-66-c2b4daa
Validator,HIPBLASLT_VERSION,0.10.0-1b6a0b5
Validator,ROCBLAS_VERSION,4.2.0-3d4f5d4
GemmTunableOp_BFloat16_TN,tn_2048_4_2048_ld_2048_2048_2048,Gemm_Hipblaslt_1219,0.0322
GemmTunableOp_float_NN,nn_960_8_576_ld_960_576_960,Gemm_Rocblas_1216,0.011
GemmTunableOp_float_NT,nt_64_64_64_ld_64_64_64,Default,0.01
GemmStridedBatchedTunableOp_float_NN,nn_64_64_64_ld_64_64_64_64,Default,0.02
"""


def test_tunableop_csv_import(tmp_path):
    src = tmp_path / "tunableop_results0.csv"
    src.write_text(HIPBLASLT_CSV)
    db = tdb.import_tunableop_csv(src)
    assert db.validators["torch"] == "2.6.0" and db.validators["tunableop.hipblaslt"] == "0.10.0-1b6a0b5"
    # linear x @ w.T with a row-major weight is B transposed: "T" first; K-major is "N"
    row = db.lookup(GemmShape(2048, 2048, 4, "bfloat16", "row", False))
    assert row.winner == "Gemm_Hipblaslt_1219" and row.times_ms == {"Gemm_Hipblaslt_1219": 0.0322}
    assert db.lookup(GemmShape(960, 576, 8, "float32", "kmajor", False)).winner == "Gemm_Rocblas_1216"
    assert len(db.entries) == 2  # transposed activation and batched GEMMs have no linear counterpart
    with pytest.raises(TuningDBError, match="rejected"):  # never used on this CPU
        db.check(tdb.current_validators("cpu"))


def test_tunableop_csv_round_trip(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text(HIPBLASLT_CSV)
    db = tdb.import_tunableop_csv(src)
    out = tdb.export_tunableop_csv(db, tmp_path / "out.csv")
    lines = out.read_text().splitlines()
    assert "Validator,PT_VERSION,2.6.0" in lines and "Validator,HIPBLASLT_VERSION,0.10.0-1b6a0b5" in lines
    assert "GemmTunableOp_BFloat16_TN,tn_2048_4_2048_ld_2048_2048_2048,Gemm_Hipblaslt_1219,0.0322" in lines
    again = tdb.import_tunableop_csv(out)
    assert again.entries == db.entries


def test_tunableop_export_writes_cpu_winners_as_default(tmp_path):
    out = tdb.export_tunableop_csv(make_db(), tmp_path / "x.csv").read_text().splitlines()
    assert out[0].startswith("Validator,PT_VERSION,")
    assert "GemmTunableOp_float_NN,nn_960_4_576_ld_960_576_960,Default,0.0900" in out
    assert len(out) == 2  # the +bias entry has no TunableOp GEMM


def test_not_a_tunableop_file(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b,c\n")
    with pytest.raises(TuningDBError, match="not a TunableOp results file"):
        tdb.import_tunableop_csv(bad)


def test_tunableop_solutions_are_handed_back_on_rocm_only(tmp_path, monkeypatch):
    import torch

    from zycompile.tuning import tunableop

    src = tmp_path / "tunableop_results0.csv"
    src.write_text(
        "Validator,PT_VERSION,2.13.0\nValidator,HIPBLASLT_VERSION,1.0-abc\n"
        "GemmTunableOp_BFloat16_TN,tn_576_4_576_ld_576_576_576,Gemm_Hipblaslt_1219,0.0120\n"
        "GemmTunableOp_BFloat16_TN,tn_960_4_576_ld_576_576_960,Default,0.0150\n"
    )
    db = tdb.import_tunableop_csv(src)
    calls = []

    class FakeTunable:
        def enable(self, on):
            calls.append(("enable", on))

        def tuning_enable(self, on):
            calls.append(("tuning_enable", on))

        def read_file(self, name):
            calls.append(("read_file", open(name).read()))
            return True

    cpu_note = tunableop.hand_back(db, torch.device("cpu"), FakeTunable(), tmp_path / "out.csv")
    assert "1 TunableOp solution(s)" in cpu_note and "need ROCm" in cpu_note and not calls
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    note = tunableop.hand_back(db, torch.device("cuda"), FakeTunable(), tmp_path / "out.csv")
    assert note.startswith("1 TunableOp solution(s) handed to TunableOp")
    assert calls[:2] == [("enable", True), ("tuning_enable", False)]  # lookup only, never tune
    text = calls[2][1]
    assert "Validator,HIPBLASLT_VERSION,1.0-abc" in text
    assert "GemmTunableOp_BFloat16_TN,tn_576_4_576_ld_576_576_576,Gemm_Hipblaslt_1219" in text
    assert "tn_960_4_576" not in text  # a Default winner is TunableOp's own default: nothing to hand
