#!/usr/bin/env bash
# One prepared run on a lent GPU box (no network): install without deps, run the GPU tests and the
# GPU benchmarks, leave logs and tables under $OUT. Usage on the device: bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/zy-gpu-out}
mkdir -p "$OUT"
pip install --no-deps -q -e . > "$OUT/install.log" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"
cp bench/RESULTS.md "$OUT/RESULTS.before.md"
# the split-KV kernel on the real device (its CPU test runs it under the interpreter)
timeout 300 python bench/split_kv_gpu.py 2>&1 | tee "$OUT/split_kv_gpu.txt"
# decode with CUDA graphs off vs on, 1B-class bf16, batch 1 and 8, next to HF static+compile
timeout 400 python bench/graphs_gpu.py 2>&1 | tail -15 | tee "$OUT/graphs_gpu.txt"
# GEMM tuning on the GPU: Triton tile/split-K sweep vs cuBLAS, 1B-class bf16 config, per shape and end to end
timeout 500 python bench/gemm_tuning.py --device cuda --repeats 3 --set model.dtype=bfloat16 \
  --set "model.source=tiny:llama?hidden_size=2048&intermediate_size=5632&num_hidden_layers=22&num_attention_heads=32&num_key_value_heads=4&head_dim=64&vocab_size=32000" \
  2>&1 | tail -25 | tee "$OUT/gemm_tuning_gpu.txt"
# engine at c=8 with and without mixed steps (prompt chunks inside decode steps), 1B-class bf16
timeout 400 python bench/mixed_steps.py --chunks 64 2>&1 | tail -12 | tee "$OUT/mixed_steps_gpu.txt"
# GPU-sensitive tests (each module skips what needs a missing package)
timeout 600 python -m pytest -q -x tests/ops -p no:cacheprovider 2>&1 | tail -20 | tee "$OUT/tests_ops.txt"
diff bench/RESULTS.md "$OUT/RESULTS.before.md" > "$OUT/RESULTS.added.diff"
cp bench/RESULTS.md "$OUT/RESULTS.md"
