#!/usr/bin/env bash
# The GPU measurements in one run, for a machine with CUDA and moequant installed with its
# triton extra: kernel speed against bf16 (evals/results/kernels-<device>.json) and GPTQ on one
# Mixtral-8x7B-shaped layer with 128 x 512 calibration tokens (evals/results/gptq-cuda.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY evals/bench_kernels.py
$PY evals/bench_gptq.py --parts solver,layer --device cuda
