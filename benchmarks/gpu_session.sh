#!/usr/bin/env bash
# The device run of a session that is lent a GPU, prepared so that it costs one call of under 10 minutes
# (every stage is time-limited to end by DEADLINE, 570 s after the start; the training's backstop may take
# 30 s more for its last save):
#   1. the end-to-end speed table of TaoCache on the full-size Wan2.1-1.3B architecture
#      (benchmarks/gpu_speed.py; 33 frames, 832x480, 50 steps, bf16, budgets 8/16/25%, one timed run each;
#      170 s at most, 111 s on an H200); skipped once its table is committed as docs/results/gpu/gpu_speed.json (SPEED=1 forces it),
#      so that later sessions give that time to the training;
#   2. training of the scenes testbed (issue 15) from the EMA weights in .carry/ or the committed ones
#      (taohooks/testbed/weights/wip/), whichever have more steps behind them, for what is left of the
#      session but MEASURE_RESERVE (100 s): about 360 s after the speed table, about 460 s without it
#      (about 550 s with MEASURE=0; TRAIN_SECONDS, whole seconds, overrides), batches of 256 drawn by 12
#      processes and rendered on the GPU (--render device: the first two GPU calls, rendered by 14 CPU processes
#      and with their noise drawn on the CPU, took 73 ms a step), trained on again, with fresh noise, up to twice
#      while no batch is ready (--echo 2; the
#      log's "(data S, echoed N of M)" says how long steps waited and how often), the learning rate annealed over the run's own time once its warmup is done (--schedule
#      cosine-time --max-minutes: TRAIN_SECONDS less 40 s for start and save, less half of it under 80 s),
#      so that the checkpoint ends annealed whatever the step count; `timeout` (TRAIN_SECONDS) is the backstop:
#      its SIGTERM makes train_scenes save its last step and exit;
#   3. the issue's measurements of the checkpoint it wrote (scenes_sensitivity, 64 held-out pairs, the model
#      on the GPU, 90 s at most; if that fails, 16 pairs on the CPU in what time is left); MEASURE=0 skips
#      them (measure the returned checkpoint at home) and gives their time to the training
#      (MEASURE_RESERVE then defaults to 10 s);
#   4. with SCENES_BENCH=1 (once a session's measurements show the checkpoint follows its prompts, >= 90%):
#      the full bench on it (configs/bench.yaml, the models on the GPU, -o $OUT/bench_scenes, with KIND=eps
#      bench_scenes-eps: taocache bench's model scenes-eps, Latte's loop) in the last
#      BENCH_RESERVE (200) s, which the training then leaves; LPIPS when .carry/lpips_alex_v0.1.safetensors is
#      carried (cp ~/.cache/taohooks/lpips_alex_v0.1.safetensors .carry/), else reported as null.
# KIND=eps trains the eps model (DDPM + learned variance, sampled in Latte's loop: the issue's second official
# loop shape) as scenes-eps[-pPATCH], from .carry/scenes-eps.safetensors if carried, else warm-started from the
# newest flow weights' trunk (train_scenes --warm-start; WARM=PATH names others, WARM=none starts from scratch).
# PATCH=4 trains the model with 4x4-pixel tokens (512 tokens, 8.2M parameters; what the testbed README says
# detail inside 8x8 tokens needs) from .carry/scenes-flow-p4.safetensors or the committed
# weights/wip/scenes-flow-p4-step*, whichever have more steps (else from scratch), and writes $OUT/scenes-flow-p4.safetensors; the
# default, PATCH=8, continues the 8x8-token model. INIT=none starts from scratch; TRAIN_EXTRA adds options
# (not --patch: PATCH= names the files too). The training state (104-131 MB, too large to come back) is
# written to STATE_DIR (/tmp; $OUT under SMOKE=1).
# Everything it writes is under $OUT (gpu.txt, gpu_speed.json/.log, $NAME.safetensors/.json (scenes-flow[-p4]),
# train.log, sensitivity.json/.log, session.log): the files come back; nothing else does.
#
# Prepare here (the package registries work here, not there), once per checkout:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
#   mkdir -p .carry && cp /work/runs/scenes/flow.safetensors .carry/scenes-flow.safetensors   # used if newer than the wip ones
#   (PATCH=4: the newest 4x4-token weights as .carry/scenes-flow-p4.safetensors)
# then, with the device tool, carrying only the files this run reads (the working tree and the carried paths travel
# within 64 MiB: the whole .carry/, with the 4x4-token and the LPIPS weights, was refused on 2026-11-27):
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".carry/scenes-flow.safetensors",
#       ".carry/scenes-flow.json"], timeout_s=600)
# (add ".carry/lpips_alex_v0.1.safetensors" for SCENES_BENCH=1; PATCH=4 carries .carry/scenes-flow-p4.safetensors).
# A call of 570 s leaves about 320 s of a 15-minute lease: while the machine is warm (30 s), copy the returned
# weights to .carry/ and call again with DEADLINE=235 and timeout_s=275 (2026-11-27: 5 733 more steps).
# The next session's run (2026-11-26, second session: the 8x8-token model draws stripes and square corners when
# started from sigma <= 0.43 but fails to form them from sigma >= 0.67, and training moves that front up; see
# "Where the detail is lost" in the testbed README), training where the front is:
#   run(command='MEASURE=0 TRAIN_EXTRA="--sigma-shift 3" bash benchmarks/gpu_session.sh', carry=[".whl",
#       ".carry/scenes-flow.safetensors", ".carry/scenes-flow.json"], timeout_s=600)
# then measure the returned checkpoint here (scenes_sensitivity; scenes_diagnose with --strength 0.4/0.6/1).
# Untried on a GPU (2026-11-27): TRAIN_EXTRA="--sigma-shift 3 --compile inductor --profile 20" (the log's first line
# includes the compilation, the later lines' s/step say whether it is faster than the 30 ms a step of the eager run;
# a compiler that fails at the first step leaves the run uncompiled, with a message in train.log; --profile prints
# where 20 steps' GPU time goes, after step 22).
# Suggested next call (2026-11-27, reasoned, not measured): batch 1024 instead of 256. At 30 ms a step the H200
# ran the 6.5M-parameter model at about 40 TFLOP/s (6 x 6.5M parameters x 32 768 tokens a step), a small part of
# what it can do, so the step time is most likely kernel launches and per-step overhead, which a 4 times larger
# batch shares out over 4 times the clips; the 12 draw workers make about 34 000 clips a second (0.35 ms a clip
# each), enough for it. The learning rate rises with the batch (square-root rule, 5e-4 x 2, kept below it):
#   run(command='MEASURE=0 TRAIN_EXTRA="--sigma-shift 3 --batch-size 1024 --lr 7e-4 --profile 20"
#       bash benchmarks/gpu_session.sh', carry=[".whl", ".carry/scenes-flow.safetensors", ".carry/scenes-flow.json"],
#       timeout_s=600)
# (TRAIN_EXTRA comes after the script's own options, so its --batch-size wins.) Its log's s/step and "(data ...)" say
# whether it pays: at 4 times the clips a step, any s/step under 0.12 is more clips a second than the 30 ms runs.
# --compile inductor is left for a later call: its compilation takes part of a call whose gain is unknown.
# Add --background-weights 1,2,1 (stripes half of the time: the one background no checkpoint forms from noise; on the
# CPU it lowered the stripe loss at every noise level against the uniform draw, the mix's within 0.8%, 2026-11-27,
# testbed README "Stripes drawn more often"):
#   TRAIN_EXTRA="--sigma-shift 3 --batch-size 1024 --lr 7e-4 --background-weights 1,2,1 --profile 20"
# PATCH=4 (the 4x4-token model, .carry/scenes-flow-p4.safetensors) is the alternative.
# After it, at home, every measurement below in one command (about 20 minutes on the 2 cores):
#   WEIGHTS=.carry/scenes-flow.safetensors BEFORE=taohooks/testbed/weights/wip/scenes-flow-step69398.safetensors \
#       bash benchmarks/scenes_after_gpu.sh
# `scenes_diagnose --x0-sigmas 0.6,0.7,0.8,0.9 --n 32` says whether the stripes are now known at
# higher noise (step 69 398: 94% of 32 held-out stripe clips at sigma 0.6, 25% at 0.8, none at 0.9; testbed README
# "From which noise level the model knows stripes"), next to `scenes_diagnose --n 64 --strength 0.6/0.8/1`.
# .whl/ and .carry/ are git-ignored. The image there has torch, einops, safetensors, pyyaml, numpy, pillow,
# tqdm and matplotlib; diffusers (for gpu_speed.py's WanTransformer3DModel) travels as a wheel.
#
# SMOKE=1 runs every step tiny on the CPU, to check the script here before spending device time:
#   SMOKE=1 OUT=/tmp/gpu_out PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
SPEED=${SPEED:-auto}
DEADLINE=${DEADLINE:-570}
MEASURE=${MEASURE:-1}
if [ "$MEASURE" = 0 ]; then MEASURE_RESERVE=${MEASURE_RESERVE:-10}; else MEASURE_RESERVE=${MEASURE_RESERVE:-100}; fi
SCENES_BENCH=${SCENES_BENCH:-0}
BENCH_RESERVE=${BENCH_RESERVE:-200}
[ "$SCENES_BENCH" = 1 ] && MEASURE_RESERVE=$(( MEASURE_RESERVE + BENCH_RESERVE ))
[ -f .carry/lpips_alex_v0.1.safetensors ] && export TAOHOOKS_LPIPS_WEIGHTS=$PWD/.carry/lpips_alex_v0.1.safetensors
TRAIN_SECONDS=${TRAIN_SECONDS:-}
# the weights the training continues from (INIT= overrides): of .carry/ (CARRY=) and the committed ones, those
# with the most steps behind them (a stale carried copy once stood in front of newer committed weights)
PATCH=${PATCH:-8}
KIND=${KIND:-flow}
case "$KIND" in flow|eps) ;; *) echo "KIND=$KIND: expected flow (Wan's loop) or eps (Latte's loop)" >&2; exit 2 ;; esac
BENCH_MODEL=$([ "$KIND" = eps ] && echo scenes-eps || echo scenes)   # taocache bench's name of the model
case "$PATCH" in 8) NAME=scenes-$KIND ;; 4|2) NAME=scenes-$KIND-p$PATCH ;; *) echo "PATCH=$PATCH: expected 8, 4 or 2" >&2; exit 2 ;; esac
case " ${TRAIN_EXTRA:-} " in *" --kind"*) echo "TRAIN_EXTRA=${TRAIN_EXTRA}: give the kind as KIND=, which names the files too" >&2; exit 2 ;; esac
case " ${TRAIN_EXTRA:-} " in *" --patch"*) echo "TRAIN_EXTRA=${TRAIN_EXTRA}: give the patch size as PATCH=, which names the files too" >&2; exit 2 ;; esac
if [ -n "$TRAIN_SECONDS" ] && ! [[ $TRAIN_SECONDS =~ ^[0-9]+$ ]]; then
    echo "TRAIN_SECONDS=$TRAIN_SECONDS: expected whole seconds" >&2; exit 2
fi
STATE_DIR=${STATE_DIR:-$([ "$SMOKE" = 1 ] && echo "$OUT" || echo /tmp)}
if [ -n "${INIT:-}" ] && [ "$INIT" != none ] && [ ! -f "$INIT" ]; then   # a typo would train from scratch all lease
    echo "INIT=$INIT: no such file (leave INIT unset to continue from the newest carried or committed weights;" \
         "INIT=none starts from scratch)" >&2
    exit 2
fi
INIT_GIVEN=${INIT:-}
if [ -z "${INIT:-}" ]; then   # of the carried and the committed weights, those with the most steps behind them
    INIT=$("$PY" -c 'import sys; from taohooks.testbed.train_scenes import newest_checkpoint as n; print(n(sys.argv[1:]) or "")' \
        "${CARRY:-.carry}/$NAME.safetensors" taohooks/testbed/weights/wip/$NAME-step*.safetensors 2>/dev/null)
    INIT=${INIT:-${CARRY:-.carry}/$NAME.safetensors}
fi
# KIND=eps without eps weights (and no INIT=): a warm start from the newest flow weights of the same patch size
# (their trunk; the output layer, twice as wide for eps, starts at zero), unless WARM=none; WARM=PATH names them
FLOW_NAME=${NAME/scenes-eps/scenes-flow}
if [ "$KIND" = eps ] && [ -z "$INIT_GIVEN" ] && [ ! -f "$INIT" ] && [ -z "${WARM:-}" ]; then
    WARM=$("$PY" -c 'import sys; from taohooks.testbed.train_scenes import newest_checkpoint as n; print(n(sys.argv[1:]) or "")' \
        "${CARRY:-.carry}/$FLOW_NAME.safetensors" taohooks/testbed/weights/wip/$FLOW_NAME-step*.safetensors 2>/dev/null)
fi
if [ -n "${WARM:-}" ] && [ "$WARM" != none ] && [ ! -f "$WARM" ]; then
    echo "WARM=$WARM: no such file (WARM=none starts the eps model from scratch)" >&2
    exit 2
fi
mkdir -p "$OUT"
started=$(date +%s)
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1 && [ "$SMOKE" != 1 ] && [ ! -f /tmp/site/.installed ]; then  # (a warm machine keeps /tmp)
    rm -rf /tmp/site && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl && touch /tmp/site/.installed
fi
[ "$SMOKE" != 1 ] && [ -f /tmp/site/.installed ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
say() { echo "[$(( $(date +%s) - started )) s] $*" | tee -a "$OUT/session.log"; }
left() { echo $(( DEADLINE - ($(date +%s) - started) )); }   # seconds until DEADLINE

if [ "$SMOKE" = 1 ]; then
    speed=(--tiny --device cpu --frames 5 --height 32 --width 32 --steps 6 --budgets 0.34 --repeats 1)
    train=(--device cpu --batch-size 2 --workers 0 --threads 2 --log-every 1 --save-every 2 --keep-every 0
           --schedule cosine-time --render device)
    train_steps=3
    measure=(--n 2 --steps 8 --skip-steps 2,5 --noise-change 0.01 --batch-size 2 --calibration-pairs 2
             --search-pairs 1 --search-iterations 2 --threads 2)
    TRAIN_SECONDS=${TRAIN_SECONDS:-120}
    SPEED=1
    measure_device=(--device "${MEASURE_DEVICE:-cpu}")   # MEASURE_DEVICE=nonsense: tries the CPU fallback
    fallback_n=2
    cat > "$OUT/bench_smoke.yaml" <<'YAML'
models: [scenes]
methods: [taocache, teacache]
budgets: [0.25]
steps: 8
eval_pairs: 2
calibration_pairs: 3
search_pairs: 1
batch_size: 2
lpips: false
timing_repeats: 1
search_iterations: 2
YAML
    bench=("$OUT/bench_smoke.yaml" --device cpu --threads 2)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
    speed=(--frames 33 --budgets 0.08 0.16 0.25 --repeats 1)
    train=(--device cuda --batch-size 256 --workers 12 --render device --echo 2 --bf16 --log-every 200
           --save-every 1000 --save-minutes 1 --keep-every 0 --schedule cosine-time)
    train_steps=1000000
    measure=(--n 64 --skip-steps 2,10,25,45 --noise-change 0.01,0.05 --batch-size 16 --calibration-pairs 8
             --threads 16)
    measure_device=(--device cuda)
    fallback_n=16
    bench=(configs/bench.yaml --device cuda --threads 16)
fi

if [ "$SPEED" = 0 ]; then
    say "1. gpu_speed.py: skipped (SPEED=0)"
elif [ "$SPEED" = auto ] && [ -f docs/results/gpu/gpu_speed.json ]; then
    say "1. gpu_speed.py: skipped (docs/results/gpu/gpu_speed.json is committed; SPEED=1 runs it again)"
else
    say "1. gpu_speed.py ${speed[*]}"
    timeout 170 "$PY" benchmarks/gpu_speed.py "${speed[@]}" --json "$OUT/gpu_speed.json" > "$OUT/gpu_speed.log" 2>&1
    say "   exit $? ($(tail -c 300 "$OUT/gpu_speed.log" | tr '\n' ' '))"
fi

init=()
if [ -f "$INIT" ]; then
    init=(--init "$INIT")
    say "   from $INIT ($("$PY" -c 'import sys; from taohooks.testbed.train_scenes import trained_steps as t; print(t(sys.argv[1]))' "$INIT" 2>/dev/null) steps behind it)"
elif [ "$KIND" = eps ] && [ -n "${WARM:-}" ] && [ "$WARM" != none ]; then
    init=(--warm-start "$WARM")
    say "   no $INIT: the eps model starts from the trunk of $WARM (--warm-start)"
else
    say "   no $INIT: the scenes training starts from scratch"
fi
TRAIN_SECONDS=${TRAIN_SECONDS:-$(( $(left) - MEASURE_RESERVE ))}
if [ "$TRAIN_SECONDS" -lt 1 ]; then   # (timeout 0 would mean no limit at all)
    say "2. train_scenes: skipped (${TRAIN_SECONDS} s left for it)"
else
    margin=$(( TRAIN_SECONDS > 80 ? 40 : TRAIN_SECONDS / 2 ))   # the process's start and last save
    minutes=$(awk "BEGIN { printf \"%.3f\", ($TRAIN_SECONDS - $margin) / 60 }")
    say "2. train_scenes for ${TRAIN_SECONDS} s (--max-minutes $minutes) ${train[*]} ${TRAIN_EXTRA:-} ${init[*]}"
    rm -f "$OUT/$NAME.safetensors" "$OUT/$NAME.json"   # (a rerun in the same $OUT: no stale weights to measure)
    timeout -k 30 "$TRAIN_SECONDS" "$PY" -m taohooks.testbed.train_scenes --kind "$KIND" --steps "$train_steps" \
        "${train[@]}" --max-minutes "$minutes" ${TRAIN_EXTRA:-} "${init[@]}" --out "$OUT/$NAME.safetensors" --state "$STATE_DIR/$NAME.state.pt" --patch "$PATCH" \
        --overwrite > "$OUT/train.log" 2>&1
    code=$?
    say "   exit $code ($(grep -E '^(step|saved|done)' "$OUT/train.log" | tail -n 2 | tr '\n' ' ')$([ $code = 0 ] || tail -n 1 "$OUT/train.log"))"
fi

if [ "$MEASURE" = 0 ]; then
    say "3. scenes_sensitivity: skipped (MEASURE=0)"
elif [ -f "$OUT/$NAME.safetensors" ] && [ "$(left)" -lt 1 ]; then
    say "3. scenes_sensitivity: skipped (the deadline has passed)"
elif [ -f "$OUT/$NAME.safetensors" ]; then
    limit=$(( $(left) < 90 ? $(left) : 90 ))
    say "3. scenes_sensitivity ${measure[*]} ${measure_device[*]} (${limit} s at most)"
    timeout "$limit" "$PY" -m taohooks.testbed.scenes_sensitivity --weights "$OUT/$NAME.safetensors" \
        "${measure[@]}" "${measure_device[@]}" --out "$OUT/sensitivity.json" > "$OUT/sensitivity.log" 2>&1
    say "   exit $? ($(grep -E 'accuracy|noise|teacache' "$OUT/sensitivity.log" | head -n 3 | tr '\n' ' '))"
    if [ ! -f "$OUT/sensitivity.json" ] && [ "$(left)" -gt 40 ]; then
        say "   again on the CPU, ${fallback_n} pairs, $(left) s at most"
        timeout "$(left)" "$PY" -m taohooks.testbed.scenes_sensitivity --weights "$OUT/$NAME.safetensors" \
            "${measure[@]}" --n "$fallback_n" --device cpu --out "$OUT/sensitivity.json" > "$OUT/sensitivity-cpu.log" 2>&1
        say "   exit $? ($(grep -E 'accuracy|noise|teacache' "$OUT/sensitivity-cpu.log" | head -n 3 | tr '\n' ' '))"
    fi
else
    say "3. no checkpoint was written: nothing to measure"
fi

if [ "$SCENES_BENCH" = 1 ] && [ -f "$OUT/$NAME.safetensors" ] && [ "$(left)" -ge 30 ]; then
    say "4. taocache bench ${bench[*]} --models $BENCH_MODEL ($(left) s at most)"
    rm -rf "$OUT/bench_$BENCH_MODEL"   # (a rerun in the same $OUT: this session's weights, this session's bench)
    timeout "$(left)" "$PY" -m taohooks.cli bench "${bench[@]}" --models "$BENCH_MODEL" \
        --weights "$BENCH_MODEL=$OUT/$NAME.safetensors" -o "$OUT/bench_$BENCH_MODEL" > "$OUT/bench.log" 2>&1
    say "   exit $? ($(tail -n 1 "$OUT/bench.log"))"
elif [ "$SCENES_BENCH" = 1 ]; then
    say "4. taocache bench: skipped (no checkpoint, or $(left) s left)"
fi
say "done"
