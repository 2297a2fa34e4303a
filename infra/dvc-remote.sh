#!/usr/bin/env bash
# Point DVC at the team's object store: a remote named `team` at s3://$S3_BUCKET/dvc, made the default.
#
# Usage, from the repo root, once per clone (after `docker compose ... up`, or with your team's values):
#   set -a; . infra/.env; set +a; bash infra/dvc-remote.sh
#   dvc push            # and `dvc pull` on another machine
#
# Needs DVC's S3 support (dvc-s3): `make setup` installs it (the `test` extra: the integration tests run a DVC
# remote on a local S3 server), and so does the compose worker's image.
#
# What goes where:
#   .dvc/config        (committed, shared): the remote's URL only.
#   .dvc/config.local  (git-ignored):       the endpoint and the credentials. The endpoint is per machine
#                      (127.0.0.1 here, http://minio:9000 inside the compose network, where the worker gets it
#                      from AWS_ENDPOINT_URL), so it is not shared either.
#
# S3_ENDPOINT_URL overrides the endpoint, e.g. for a teammate reaching the object store through a proxy.
set -euo pipefail
: "${S3_BUCKET:?set S3_BUCKET (see infra/.env.example)}"
: "${S3_ACCESS_KEY_ID:?set S3_ACCESS_KEY_ID (see infra/.env.example)}"
: "${S3_SECRET_ACCESS_KEY:?set S3_SECRET_ACCESS_KEY (see infra/.env.example)}"
command -v dvc >/dev/null || { echo "dvc not found: activate the project's .venv first" >&2; exit 1; }

# compose publishes the S3 API on the host's loopback (S3_PORT, default 9000)
endpoint="${S3_ENDPOINT_URL:-http://127.0.0.1:${S3_PORT:-9000}}"

dvc remote add --force --default team "s3://${S3_BUCKET}/dvc"
dvc remote modify --local team endpointurl "$endpoint"
dvc remote modify --local team access_key_id "$S3_ACCESS_KEY_ID"
dvc remote modify --local team secret_access_key "$S3_SECRET_ACCESS_KEY"
echo "DVC remote 'team' -> s3://${S3_BUCKET}/dvc at $endpoint (endpoint and credentials in .dvc/config.local)"
