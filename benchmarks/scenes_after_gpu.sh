#!/usr/bin/env bash
# The measurements of a scenes checkpoint that a GPU call brought back (issue 15), on this machine's CPUs, in one
# command: what the testbed README's tables report, each step's JSON and log under OUT, a line per step on stdout.
#   WEIGHTS=.carry/scenes-flow.safetensors [BEFORE=taohooks/testbed/weights/wip/scenes-flow-step69398.safetensors] \
#       [OUT=runs/after_gpu] [JOBS=2] [SENSITIVITY=1] bash benchmarks/scenes_after_gpu.sh
# Steps (one thread each, JOBS of them at a time; 2 cores: about 20 minutes with the sensitivity, 6 without):
#   1. scenes_diagnose --n 64 --strength 0.6 / 0.8 / 1 (strict accuracy; stripes and square corners passing, of 21/32)
#   2. scenes_diagnose --n $(( (N + 1) / 2 )) --x0-sigmas 0.6,0.7,0.8,0.9 (from which noise level the model knows stripes)
#   3. scenes_loss on WEIGHTS (and BEFORE, for the same table) on the training mix and on stripe clips only
#   4. with SENSITIVITY=1, scenes_sensitivity --n 64 (the targets: single reused steps, 1% / 5% noise
#      changes, TeaCache at 4%, late delta cosine, accuracy; about 11 minutes on one thread)
set -uo pipefail
WEIGHTS=${WEIGHTS:?"WEIGHTS=the checkpoint to measure (e.g. .carry/scenes-flow.safetensors)"}
BEFORE=${BEFORE:-}
OUT=${OUT:-runs/after_gpu}
JOBS=${JOBS:-2}
SENSITIVITY=${SENSITIVITY:-1}
N=${N:-64}  # held-out pairs (the x0 step takes half of them); N=2 SENSITIVITY=0 checks the script in a minute
PY=${PYTHON:-python3}
[ -f "$WEIGHTS" ] || { echo "WEIGHTS=$WEIGHTS: no such file" >&2; exit 2; }
[ -z "$BEFORE" ] || [ -f "$BEFORE" ] || { echo "BEFORE=$BEFORE: no such file" >&2; exit 2; }
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "JOBS=$JOBS: expected a whole number >= 1" >&2; exit 2; }
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "N=$N: expected a whole number >= 1" >&2; exit 2; }
mkdir -p "$OUT" || exit 2
export OMP_NUM_THREADS=1
steps=()
for s in 0.6 0.8 1; do
    steps+=("diagnose_s$s|$PY -m taohooks.testbed.scenes_diagnose --weights $WEIGHTS --n $N --strength $s --threads 1 --out $OUT/diagnose_s$s.json")
done
steps+=("x0|$PY -m taohooks.testbed.scenes_diagnose --weights $WEIGHTS --n $(( (N + 1) / 2 )) --x0-sigmas 0.6,0.7,0.8,0.9 --threads 1 --out $OUT/x0.json")
steps+=("loss_mix|$PY -m taohooks.testbed.scenes_loss --weights $BEFORE $WEIGHTS --threads 1 --out $OUT/loss_mix.json")
steps+=("loss_stripes|$PY -m taohooks.testbed.scenes_loss --weights $BEFORE $WEIGHTS --background-weights 0,1,0 --batches 4 --batch-size 32 --threads 1 --out $OUT/loss_stripes.json")
[ "$SENSITIVITY" = 1 ] && steps+=("sensitivity|$PY -m taohooks.testbed.scenes_sensitivity --weights $WEIGHTS --n $N --skip-steps 2,10,25,45 --noise-change 0.01,0.05 --calibration-pairs 8 --threads 1 --out $OUT/sensitivity.json")
start=$(date +%s)
failed=0
run() {  # name|command: its log under OUT, one line on stdout
    local name=${1%%|*} command=${1#*|} t0 code
    t0=$(date +%s)
    $command > "$OUT/$name.log" 2>&1
    code=$?
    echo "[$(( $(date +%s) - start )) s] $name: exit $code in $(( $(date +%s) - t0 )) s ($OUT/$name.log)"
    return $code
}
running=0
for step in "${steps[@]}"; do
    run "$step" &
    running=$(( running + 1 ))
    if [ "$running" -ge "$JOBS" ]; then wait -n || failed=1; running=$(( running - 1 )); fi
done
while [ "$running" -gt 0 ]; do wait -n || failed=1; running=$(( running - 1 )); done
echo "done in $(( $(date +%s) - start )) s: $OUT"
exit $failed
