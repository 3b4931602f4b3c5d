#!/usr/bin/env bash
# The GPU checks in one go (for a machine with CUDA): the CUDA tests, then the distillation
# step benchmark on the GPU. Results and logs go to ${OUT:-bench/results}.
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
nvidia-smi -L | tee "$out/gpu-device.txt"
python3 -m pytest -q -p no:cacheprovider tests/cmkd_core/test_cuda.py 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
python3 bench/distill.py --device cuda --batches 64 256 1024 4096 --out "$out" 2>&1 \
  | tee "$out/gpu-bench.log"
exit $(( tests || PIPESTATUS[0] ))
