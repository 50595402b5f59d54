"""Shared by the Triton kernel tests: run a check script under Triton's interpreter (no GPU here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture
def run_interpreted():
    """``run(code) -> stdout``: ``code`` in a fresh process with TRITON_INTERPRET=1 (it must be set
    before triton compiles any kernel, hence the subprocess); fails the test with its stderr."""
    pytest.importorskip("triton")

    def run(code: str) -> str:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    return run
