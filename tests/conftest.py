"""Shared fixtures: a per-session tally of property-test cases, printed in the terminal summary; a
per-session step cache directory (saved compiled steps never leak between runs or into ~/.cache)."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ["ZYCOMPILE_STEP_CACHE"] = tempfile.mkdtemp(prefix="zy-test-steps-")

_CASES = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def case_counter(pytestconfig) -> dict:
    """``case_counter[name] += 1`` per checked case; the totals appear at the end of the run."""
    return pytestconfig.stash.setdefault(_CASES, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = config.stash.get(_CASES, None)
    if counts:
        terminalreporter.write_sep("-", "property-test cases checked")
        for name, n in sorted(counts.items()):
            terminalreporter.write_line(f"{name}: {n}")
