"""Shared fixtures: a per-session tally of property-test cases, printed in the terminal summary; a
per-session step cache directory (saved compiled steps never leak between runs or into ~/.cache);
``--full`` for the costlier variants of tests whose code paths a cheaper variant already covers."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ["ZYCOMPILE_STEP_CACHE"] = tempfile.mkdtemp(prefix="zy-test-steps-")

# Under xdist each worker takes its share of the cores: two workers of 2 threads on CI's 2 cores
# preempt each other's parallel regions (the 10 heaviest tests/runtime/test_speculative.py tests ran
# 168-176 s with one thread per worker against 173-186 s with two, in pairs).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # the child processes tests start
    import torch

    torch.set_num_threads(_THREADS)

_CASES = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def case_counter(pytestconfig) -> dict:
    """``case_counter[name] += 1`` per checked case; the totals appear at the end of the run."""
    return pytestconfig.stash.setdefault(_CASES, {})


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)  # an xdist worker: report to the controller
    if workeroutput is not None:
        workeroutput["cases"] = dict(session.config.stash.get(_CASES, {}))


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown without it
def pytest_testnodedown(node, error):  # xdist's controller: add up the workers' tallies
    counts = node.config.stash.setdefault(_CASES, {})
    for name, n in getattr(node, "workeroutput", {}).get("cases", {}).items():
        counts[name] = counts.get(name, 0) + n


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = config.stash.get(_CASES, None)
    if counts:
        terminalreporter.write_sep("-", "property-test cases checked")
        for name, n in sorted(counts.items()):
            terminalreporter.write_line(f"{name}: {n}")


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        help="also run the tests marked full and the 4-rank variants marked full_world4 (CI skips them)",
    )


def _world(item) -> int | None:
    params = getattr(item, "callspec", None)
    params = params.params if params else {}
    return params.get("world", params.get("group"))


def pytest_collection_modifyitems(config, items):
    """Skip, with a reason in the summary, what only ``--full`` runs: on CI's 2 cores 4 gloo ranks of a
    whole generation cost 50-90 s a test, while the 2-rank variant runs the same code."""
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="costlier variant of a test that runs: pytest --full runs it")
    for item in items:
        if item.get_closest_marker("full") or (item.get_closest_marker("full_world4") and _world(item) == 4):
            item.add_marker(skip)
