#!/usr/bin/env bash
# Point DVC at the team's object store: a remote `team` at s3://$S3_BUCKET/dvc, made the default.
# Usage (repo root, after `docker compose ... up`):  set -a; . infra/.env; set +a; bash infra/dvc-remote.sh
# Then `dvc push` / `dvc pull`. Needs DVC's S3 support: pip install 'dvc[s3]==3.67.1'.
# The endpoint goes in .dvc/config (shared); the credentials only in .dvc/config.local (git-ignored).
set -euo pipefail
: "${S3_BUCKET:?set S3_BUCKET (see infra/.env.example)}"
: "${S3_ACCESS_KEY_ID:?set S3_ACCESS_KEY_ID}"
: "${S3_SECRET_ACCESS_KEY:?set S3_SECRET_ACCESS_KEY}"
endpoint="${S3_ENDPOINT_URL:-http://127.0.0.1:${S3_PORT:-9000}}"  # compose publishes the S3 API on loopback
dvc remote add --force --default team "s3://${S3_BUCKET}/dvc"
dvc remote modify team endpointurl "$endpoint"
dvc remote modify --local team access_key_id "$S3_ACCESS_KEY_ID"
dvc remote modify --local team secret_access_key "$S3_SECRET_ACCESS_KEY"
echo "DVC remote 'team' -> s3://${S3_BUCKET}/dvc at $endpoint (credentials in .dvc/config.local)"
