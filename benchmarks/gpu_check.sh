#!/usr/bin/env bash
# The GPU checks of issue 18, for a machine with one CUDA GPU (never needed by the test suite):
#   1. MiniLM and mpnet: trainers.fit step time vs a plain loop, bf16 autocast;
#   2. DeepSpeed ZeRO-3 on one GPU through Ray Train (same models);
#   3. batched augmentation throughput on the GPU (augment_throughput adds a cuda case).
# Writes benchmarks/results/gpu.md (and gpu_step.json, augment_throughput.* as usual).
#   bash benchmarks/gpu_check.sh            # ~10 min on one modern GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
OUT=benchmarks/results/gpu.md

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU visible')"
$PY -c "from trainers.mpnet import mpnet_path; mpnet_path()" 2>/dev/null || {
  echo "mpnet pieces missing: installing them (make mpnet)"; make mpnet; }

$PY -m benchmarks.gpu_step --models minilm mpnet --steps 60 | tee /tmp/gpu_step.log
$PY -m benchmarks.augment_throughput --threads 1 --repeats 3 --out /tmp/gpu-augment | tee /tmp/gpu_augment.log

{
  echo "# GPU checks (benchmarks/gpu_check.sh)"
  echo
  echo "Run on $(date -u +%Y-%m-%d) on $($PY -c 'import torch; print(torch.cuda.get_device_name())'), torch $($PY -c 'import torch; print(torch.__version__)')."
  echo
  echo "## Step time: trainers.fit vs a plain bf16 loop; DeepSpeed ZeRO-3 on one GPU"
  echo
  cat benchmarks/results/gpu_step.md
  echo
  echo "## Batched augmentation throughput (includes the cuda case)"
  echo
  cat /tmp/gpu-augment/augment_throughput.md
} > "$OUT"
echo "wrote $OUT"
