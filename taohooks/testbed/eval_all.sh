#!/usr/bin/env bash
# Held-out recogniser accuracy (64 eval pairs, 50 steps, default guidance) of the bundled checkpoints.
# Writes logs/eval_<kind>[_<scheduler>].json and logs/grid_<kind>.png. Usage (repo root):
#   bash taohooks/testbed/eval_all.sh
set -uo pipefail
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
W=taohooks/testbed/weights
L=taohooks/testbed/logs
mkdir -p "$L"  # (not in the repository: .gitignore)
ev() { "$PY" -m taohooks.testbed.evaluate --n 64 --steps 50 --threads 1 "$@"; }
for kind in flow flow-lognormal; do
  [ -f "$W/$kind.safetensors" ] && ev --weights "$W/$kind.safetensors" --grid "$L/grid_$kind.png" > "$L/eval_$kind.json"
done
if [ -f "$W/eps.safetensors" ]; then
  ev --weights "$W/eps.safetensors" --scheduler ddim --grid "$L/grid_eps.png" > "$L/eval_eps_ddim.json"
  ev --weights "$W/eps.safetensors" --scheduler pndm > "$L/eval_eps_pndm.json"
fi
