"""``zycompile bench`` end to end on a tiny random model: every output file, every number."""

from __future__ import annotations

import json

import torch

from zycompile.cli import main


def test_bench_tiny_random_writes_all_outputs(tmp_path, capsys):
    torch._dynamo.reset()
    out = tmp_path / "out"
    md = tmp_path / "RESULTS.md"
    code = main(
        [
            "bench",
            "--recipe", "llama-tiny",
            "--set", "lowering.backend=aot_eager",
            "--dataset", "random", "--input-len", "12", "--output-len", "5", "--num-prompts", "4",
            "--max-concurrency", "1", "2",
            "--systems", "hf-eager", "zycompile",
            "--output-dir", str(out),
            "--append-results", str(md),
        ]
    )  # fmt: skip
    assert code == 0
    for name in ("results.json", "report.md", "throughput.png", "ttft.png"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    for system in ("hf-eager", "zycompile"):
        for c in ("1", "2"):
            m = data["results"][system][c]
            assert m["completed"] == 4 and m["output_tokens"] == 20
            assert m["ttft_median_ms"] > 0 and m["output_throughput"] > 0 and 0 < m["mbu"]
            assert len(data["requests"][system][c]) == 4
            assert (0 < m.get("prefill_mfu", 0) < 1) == (c == "1")  # TTFT is prefill alone at c=1 only
    assert data["matmul_peak_flop_s"] > 1e8
    table = capsys.readouterr().out
    assert "aggregate tok/s c=2" in table and "zycompile" in table
    assert "| zycompile |" in md.read_text() and "prefill MFU" in md.read_text()


def test_bench_rejects_concurrency_beyond_slots(capsys):
    code = main(["bench", "--recipe", "llama-tiny", "--max-concurrency", "64", "--dataset", "random"])
    assert code == 2
    assert "batch bucket" in capsys.readouterr().err
