#!/usr/bin/env bash
# Set up, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ruff check .
ruff format --check .
# A worker per core, an idle one taking tests from the other's queue: the cold suite ran in 22 min on
# the 2-core Xeon (41 min serially, 26 min with whole files per worker). That run also set
# OMP_WAIT_POLICY=PASSIVE, dropped since: alone, it slowed the tuning CLI test from 58 to 77 s.
python -m pytest -q -ra -n auto --dist worksteal --durations=20
