#!/usr/bin/env bash
# Set up, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ruff check .
ruff format --check .
python -m pytest -q -ra -n auto --dist loadfile  # a worker per core, a test file per worker
