#!/bin/bash
# Usage (after `make run`, which leaves data/shards: 62,961 train records): bash benchmarks/stage_memory.sh
# The small folder is a fresh ingest of the first 3,000 Fashion-MNIST inputs; both runs use the embedded default.
# Peak memory of a training stage (align_latent, 30 steps) on two ingest folders of different sizes.
set -euo pipefail
cd /work/main
export PATH=/work/main/.venv/bin:$PATH DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
mkdir -p /tmp/ho && rm -rf /tmp/ho/small /tmp/ho/out-* /tmp/ho/ck-* /tmp/ho/res-*.jsonl
python -m aligntok --set data.max_images=3000 -q ingest --no-progress fashion-mnist /tmp/ho/small 2>&1 | tail -2
python -m aligntok -q validate --report-dir /tmp/ho/small-validation /tmp/ho/small 2>&1 | tail -2
for n in small big; do
  data=/tmp/ho/small; val=/tmp/ho/small-validation/validation.json
  if [ $n = big ]; then data=data/shards; val=reports/validation/validation.json; fi
  /usr/bin/time -v env ALIGNTOK_RESOURCE_LOG=/tmp/ho/res-$n.jsonl python -m aligntok --set align_latent.steps=30 --set align_latent.val_images=64 -q \
    align_latent --data $data --validation $val --out /tmp/ho/out-$n --checkpoints /tmp/ho/ck-$n --no-register --no-progress 2> /tmp/ho/time-$n.txt
  python - "$data" $n <<'PY'
import json,sys
d=json.load(open(sys.argv[1]+"/dataset.json"))
r=[json.loads(l) for l in open(f"/tmp/ho/res-{sys.argv[2]}.jsonl")][-1]
print(sys.argv[2], "train records", d["counts"]["train"], "peak_rss_mb", r["peak_rss_mb"], "wall", r["wall_seconds"])
PY
done
