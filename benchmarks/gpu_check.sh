#!/usr/bin/env bash
# One command for a GPU machine: the paper-scale presets in bf16 (see benchmarks/gpu_check.py), then every
# stage's own code a few steps on the device at those shapes (benchmarks/gpu_stages.py); figures to stdout,
# benchmarks/out/gpu_check.json and benchmarks/out/gpu_stages.json. Budget: under 10 minutes on an H200.
#   bash benchmarks/gpu_check.sh            # GPU
#   bash benchmarks/gpu_check.sh --tiny     # CPU smoke run at tiny size
set -euo pipefail
cd "$(dirname "$0")/.."
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
python=${PYTHON:-python}
[ -x .venv/bin/python ] && python=.venv/bin/python
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 420 "$python" benchmarks/gpu_check.py --json benchmarks/out/gpu_check.json "$@"
timeout 240 "$python" benchmarks/gpu_stages.py --json benchmarks/out/gpu_stages.json "$@"
