"""The ``zycompile`` command: help, recipe check/show, clean one-line errors, run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from zycompile.cli import main

RECIPES = sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "bench", "recipe"):
        assert cmd in out


def test_recipe_check_passes_for_every_shipped_recipe(capsys):
    assert RECIPES
    assert main(["recipe", "check", *RECIPES]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == len(RECIPES)


def test_recipe_check_fails_on_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runtime: {max_seq_len: big}\n")
    assert main(["recipe", "check", RECIPES[0], str(bad)]) == 1
    out = capsys.readouterr().out
    assert "runtime.max_seq_len" in out and "'big'" in out and str(bad) in out


def test_recipe_show_applies_overrides(capsys):
    assert main(["recipe", "show", "llama-tiny", "--set", "runtime.max_seq_len=512"]) == 0
    out = capsys.readouterr().out
    assert "max_seq_len: 512" in out and "hash" in out


def test_errors_are_one_line_with_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "-m", "zycompile", "recipe", "show", "llama-tiny", "--set", "runtime.graphs=maybe"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "runtime.graphs" in proc.stderr and "'maybe'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_on_a_model_without_tokenizer_is_a_clean_error(capsys):
    code = main(
        [
            "run",
            "--recipe",
            "llama-tiny",
            "--set",
            "lowering.backend=aot_eager",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ]
    )
    assert code == 2
    assert "no tokenizer" in capsys.readouterr().err
