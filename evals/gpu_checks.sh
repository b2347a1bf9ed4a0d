#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA, PyTorch and Triton but maybe not moequant:
#   1. the compiled kernels against the torch reference (tests/gpu),
#   2. kernel speed against bf16, with a sweep of tile configurations (kernels-<device>.json),
#   3. with RUN_GPTQ=1, GPTQ on one Mixtral-8x7B-shaped layer with 128 x 512 calibration tokens
#      (gptq-cuda.json);
#   4. offloaded experts: cache hits, prefetch accuracy and decode speed with 2, 4 and 6 experts cached per
#      layer against the fully loaded bundled model (offload-cuda.json; tests/gpu checks their logits);
#   5. where vLLM imports (VLLM_PYTHON, default $PYTHON), vLLM serves the bundled model's 4- and 8-bit
#      outputs, GPTQ and compressed-tensors, against moequant's greedy tokens (interop-vllm.json).
# Logs and JSON go to $RESULTS (default evals/results/gpu-run). Wheels of missing Python packages
# may be put in .whl/ (installed into /tmp/site first). Each step has its own time limit.
# Environment: SWEEP_BUDGET_S (default 120), RUN_GPTQ=1, SKIP_TESTS=1, BENCH_ARGS (extra arguments).
# The step limits (240 + 300 + 60 s, and 130 s for GPTQ: then lower SWEEP_BUDGET_S or skip the tests)
# keep a run under ten minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-evals/results/gpu-run}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$RESULTS/install.log" 2>&1 \
    || { echo "moequant install failed (see install.log); using PYTHONPATH"; export PYTHONPATH=.:${PYTHONPATH:-}; }
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout 240 $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -25 | tee "$RESULTS/tests-gpu.log"
fi
timeout 300 $PY evals/bench_kernels.py --sweep --sweep-budget-s "${SWEEP_BUDGET_S:-120}" \
    --out "$RESULTS/kernels.json" ${BENCH_ARGS:-} 2>&1 | tee "$RESULTS/kernels.log" | grep -v "^    sweep"
if [ "${RUN_GPTQ:-0}" = 1 ]; then
    timeout 130 $PY evals/bench_gptq.py --parts layer --device cuda 2>&1 | tail -5 | tee "$RESULTS/gptq.log"
    cp evals/results/gptq-cuda.json "$RESULTS/" 2>/dev/null || true
fi
timeout 60 $PY evals/bench_offload.py --device cuda --windows 4 2>&1 | grep -v Warning | tail -4 | tee "$RESULTS/offload.log"
cp evals/results/offload-cuda.json "$RESULTS/" 2>/dev/null || true
VLLM_PY=${VLLM_PYTHON:-$PY}
if $VLLM_PY -c "import vllm" 2>/dev/null; then
    timeout 240 $PY evals/interop.py --only-vllm --vllm-python "$(command -v "$VLLM_PY")" \
        --output "$RESULTS/interop-vllm.json" 2>&1 | tail -20 | tee "$RESULTS/interop-vllm.log"
else
    echo "vLLM check skipped: needs vLLM importable by \$VLLM_PYTHON"
fi
