#!/usr/bin/env bash
# A local Prefect server and a `process` worker for this checkout (`make serve`). The server listens on
# 127.0.0.1:$PREFECT_PORT only; the worker runs the flow runs of prefect.yaml's deployments in this checkout.
# Ctrl-C stops both. Deploy from another shell with `make deploy`.
set -euo pipefail
port="${PREFECT_PORT:-4200}"
pool="${ALIGNTOK_WORK_POOL:-aligntok-process}"
export PREFECT_API_URL="http://127.0.0.1:${port}/api"
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1

prefect server start --host 127.0.0.1 --port "$port" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 180); do
  curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { echo "prefect server exited; see its output above" >&2; exit 1; }
  sleep 1
done
curl -fsS "$PREFECT_API_URL/health" >/dev/null || { echo "prefect server did not answer $PREFECT_API_URL in 180 s" >&2; exit 1; }
prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
echo "Prefect UI: http://127.0.0.1:${port}  (deploy with: make deploy)"
prefect worker start --pool "$pool" --type process
