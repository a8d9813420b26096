#!/usr/bin/env bash
# Train the three bundled testbed checkpoints' first runs one after another on one CPU thread: 4200 steps each, the
# recipe of the shipped flow and flow-lognormal; the shipped eps continued from there (5000 and 3000 more steps
# with --init, taohooks/testbed/README.md). Writes OUT/<kind>.safetensors (default runs/testbed-weights; the shipped
# checkpoints are never replaced unless OUT names their folder) and logs/train_<kind>.log.
# Usage (from the repo root; KINDS, STEPS and OUT may be overridden):
#   mkdir -p taohooks/testbed/logs && nohup bash taohooks/testbed/train_all.sh > taohooks/testbed/logs/train_all.log 2>&1 &
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-4200}
OUT=${OUT:-runs/testbed-weights}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p taohooks/testbed/logs "$OUT"
for kind in ${KINDS:-flow eps flow-lognormal}; do
  echo "=== $kind start $(date -Is)"
  "$PY" -m taohooks.testbed.train --kind "$kind" --steps "$STEPS" --threads 1 \
    --out "$OUT/$kind.safetensors" > "taohooks/testbed/logs/train_$kind.log" 2>&1
  echo "=== $kind end $(date -Is)"
done
