#!/usr/bin/env bash
# Set up, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ruff check .
ruff format --check .
# A worker per core, an idle one taking tests from the other's queue, OpenMP threads sleeping when
# idle instead of spinning on the core the other worker needs. Cold suite on the 2-core Xeon: 22 min
# (41 min serially, 26 min with whole files per worker); a run without OMP_WAIT_POLICY=PASSIVE was
# at 80% after 21.5 min.
OMP_WAIT_POLICY=PASSIVE python -m pytest -q -ra -n auto --dist worksteal --durations=20
