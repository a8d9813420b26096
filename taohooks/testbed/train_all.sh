#!/usr/bin/env bash
# Train the three bundled testbed checkpoints one after another on one CPU thread.
# Usage (from the repo root; KINDS and STEPS may be overridden): nohup bash taohooks/testbed/train_all.sh > taohooks/testbed/logs/train_all.log 2>&1 &
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-4200}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p taohooks/testbed/logs taohooks/testbed/weights
for kind in ${KINDS:-flow eps flow-lognormal}; do
  echo "=== $kind start $(date -Is)"
  "$PY" -m taohooks.testbed.train --kind "$kind" --steps "$STEPS" --threads 1 \
    --out "taohooks/testbed/weights/$kind.safetensors" > "taohooks/testbed/logs/train_$kind.log" 2>&1
  echo "=== $kind end $(date -Is)"
done
