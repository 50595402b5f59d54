#!/usr/bin/env bash
# Set up, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ruff check .
ruff format --check .
# A worker per core, an idle one taking tests from the other's queue (whole files per worker ran a
# cold suite in 26 min on 2 cores, over budget). Passive OpenMP waits: one worker's idle BLAS threads
# sleep instead of spinning on the core the other worker's Dynamo trace needs.
OMP_WAIT_POLICY=PASSIVE python -m pytest -q -ra -n auto --dist worksteal --durations=20
