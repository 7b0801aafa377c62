#!/usr/bin/env bash
# Speed II (issue 10) on one H100: training the tutorial UNet at 128x128 in bf16, compiled, with the fast paths.
#   1. benchmarks/norm_fusion.py on the GPU (no timing, about a minute): the ops of one ResnetBlock2D eager and
#      Triton's kernels compiled, with torch's norm and the fast norm: what --fast_norm can save
#   2. benchmark.py --fast_norm, eager, batch $BATCH: ddpm with the fast norm against diffusers (no compile: a
#      minute; eager is what the butterflies-128 preset runs, and where the fast norm writes fewer bytes)
#   3. benchmark.py --compile, batch $BATCH: ddpm compiled against diffusers compiled, in one process
#   4. benchmark.py --compile ddpm --channels_last --force_layout_opt, batch $BATCH (diffusers eager)
#   5. benchmark.py --compile ddpm --fast_norm, with the layout of the faster of 3 and 4
#   6. the fastest of 3-5 (ddpm's images/s) at batch $BIG_BATCH, with --profile 30: the final step's top kernels
#   7. train.py with the flags of 6, $STEPS steps at batch $BIG_BATCH: the whole loop against 6
# In that order of priority: each part gets at most what is left of $BUDGET seconds (default 480), so a slow compile
# cuts the later parts short; all seven take about 12 minutes on an H100 (a cold compile of this UNet is 1-2 minutes),
# more than one call of the device tool. (--fast_norm comes after channels_last: in an emulation on the CPU,
# Inductor fused CUDA autocast's fp32 GroupNorm into bf16 kernels by itself: docs/benchmarks.md.)
# EXTRA=1 adds (for a second lease: up to 10 more minutes), on the flags of 6: cuDNN autotuning, CUDA graphs
# (reduce-overhead), foreach instead of fused AdamW, batch 256, max-autotune.
# Usage: OUT=results-dir bash benchmarks/speed2_gpu.sh   (diffusers must be importable: see the lease's wheels);
# on the device machine run it as PARTS=speed2 bash benchmarks/gpu_check.sh, which packs its ~12 files into one
# archive (the device tool brings back at most 8 files).
# On a CPU, to check that each command runs (inductor builds C++: slow; a quickstart model for train.py):
#   DEVICE=cpu CONFIG=small BATCH=2 BIG_BATCH=4 PRESET=quickstart STEPS=20 BUDGET=7200 LIMIT_SCALE=8 \
#       PYTHON=python OUT=/tmp/speed2 bash benchmarks/speed2_gpu.sh
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/benchmark.py imports ddpm from the checkout
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda} CONFIG=${CONFIG:-tutorial128} PRESET=${PRESET:-butterflies-128}
BATCH=${BATCH:-64} BIG_BATCH=${BIG_BATCH:-128} STEPS=${STEPS:-200} BUDGET=${BUDGET:-480} EXTRA=${EXTRA:-0}
LIMIT_SCALE=${LIMIT_SCALE:-1}  # multiplies each part's own time limit (a CPU check needs ~8)
BENCH=(benchmarks/benchmark.py --config "$CONFIG" --device "$DEVICE" --dtype bf16 --measure train
       --repeats 5 --train_steps 3)

part() { echo; echo "=== $(date +%T), ${SECONDS}s in: $1"; }

# Seconds for the next part: its own limit, or what is left of $BUDGET if less (0: skip it). A part still
# running at its limit gets SIGTERM, then SIGKILL 20 s later (train.py finishes its step on SIGTERM).
limit() {
    local own=$(($1 * LIMIT_SCALE)) left=$((BUDGET - SECONDS - 20))
    if [ "$left" -lt 30 ]; then echo 0; elif [ "$left" -lt "$own" ]; then echo "$left"; else echo "$own"; fi
}

# benchmark.py NAME LIMIT FLAGS...: one run, its table in $OUT/NAME.md and its log in $OUT/NAME.log.
bench() {
    local name=$1 seconds; seconds=$(limit "$2"); shift 2
    part "$name: benchmark.py $*"
    if [ "$seconds" = 0 ]; then echo "skipped: the budget of ${BUDGET}s is spent"; return; fi
    timeout -k 20 "$seconds" "$PYTHON" "${BENCH[@]}" "$@" --markdown "$OUT/$name.md" 2>&1 | tee "$OUT/$name.log" \
        | grep -v Warning
    echo "exit code ${PIPESTATUS[0]} (limit ${seconds}s)"
}

# ddpm's training images/s in $OUT/NAME.md, or 0 if that part did not finish.
rate() {
    "$PYTHON" - "$OUT/$1.md" <<'EOF'
import sys
from pathlib import Path
path = Path(sys.argv[1])
rows = [line.split("|") for line in path.read_text().splitlines() if line.startswith("| training, images/")] \
    if path.exists() else []
print(rows[0][2].strip() if rows else 0)
EOF
}

# Median images/s of train.py's 10-step windows after the first 50 steps (compiling, cuDNN set-up), from TensorBoard.
loop_rate() {
    "$PYTHON" - "$1" <<'EOF'
import statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
events = EventAccumulator(sys.argv[1] + "/logs").Reload()
rates = [e.value for e in events.Scalars("train/images_per_s") if e.step > 50]
if rates:
    print(f"train.py {sys.argv[1]}: median {statistics.median(rates):.1f} images/s over {len(rates)} windows of 10 "
          f"steps after step 50 (min {min(rates):.1f}, max {max(rates):.1f})")
else:
    print(f"train.py {sys.argv[1]}: no 10-step window after step 50")
EOF
}

part "machine"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
fi
"$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

seconds=$(limit 120)
part "benchmarks/norm_fusion.py: GroupNorm under bf16 autocast, eager ops and Inductor's kernels"
if [ "$seconds" = 0 ]; then echo "skipped: the budget of ${BUDGET}s is spent"
else timeout -k 20 "$seconds" "$PYTHON" benchmarks/norm_fusion.py --device "$DEVICE" 2>&1 | grep -v Warning \
    | tee "$OUT/norm_fusion.txt"; fi

# faster(A B): whether ddpm's images/s in part B's table beat part A's
faster() { awk -v a="$(rate "$1")" -v b="$(rate "$2")" 'BEGIN { exit !(b > a) }'; }

bench eager_fast_norm 100 --batch_size "$BATCH" --fast_norm
bench plain 240 --batch_size "$BATCH" --compile
bench channels_last 150 --batch_size "$BATCH" --compile ddpm --channels_last --force_layout_opt
if faster plain channels_last; then
    LAYOUT=(--channels_last --force_layout_opt) TRAIN_FLAGS=(--channels_last)  # train.py forces the layout itself
    BEST=channels_last
else
    LAYOUT=() TRAIN_FLAGS=() BEST=plain
fi
bench fast_norm 150 --batch_size "$BATCH" --compile ddpm ${LAYOUT[@]+"${LAYOUT[@]}"} --fast_norm
if faster "$BEST" fast_norm; then
    LAYOUT+=(--fast_norm) TRAIN_FLAGS+=(--fast_norm) BEST=fast_norm
fi
part "ddpm images/s at batch $BATCH: compiled $(rate plain), + channels_last and the forced layout \
$(rate channels_last), + fast_norm $(rate fast_norm): kept ${LAYOUT[*]:-no flag}"

bench best_big_batch 140 --batch_size "$BIG_BATCH" --compile ddpm ${LAYOUT[@]+"${LAYOUT[@]}"} --profile 30

seconds=$(limit 150)
part "train.py --compile ${TRAIN_FLAGS[*]:-}, $STEPS steps at batch $BIG_BATCH"
if [ "$seconds" = 0 ]; then
    echo "skipped: the budget of ${BUDGET}s is spent"
else
    rm -rf /tmp/speed2-loop  # a rerun's logs must not mix with the last run's
    timeout -k 20 "$seconds" "$PYTHON" train.py --preset "$PRESET" --builtin_data --device "$DEVICE" --mixed_precision bf16 \
        --train_batch_size "$BIG_BATCH" --use_ema --dataloader_num_workers 4 --logging_steps 10 \
        --ddpm_num_inference_steps 20 --checkpointing_steps 100000 --max_train_steps "$STEPS" --compile \
        ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"} --output_dir /tmp/speed2-loop > "$OUT/loop.log" 2>&1
    echo "exit code $? (limit ${seconds}s)"; tail -c 400 "$OUT/loop.log"; echo
    loop_rate /tmp/speed2-loop | tee "$OUT/loop.txt"
    echo "model only, the same flags and batch (6): $(rate best_big_batch) images/s" | tee -a "$OUT/loop.txt"
fi

if [ "$EXTRA" = 1 ]; then
    BUDGET=$((BUDGET + 600))
    bench cudnn_benchmark 120 --batch_size "$BATCH" --compile ddpm ${LAYOUT[@]+"${LAYOUT[@]}"} --cudnn_benchmark
    bench cuda_graphs 120 --batch_size "$BATCH" --compile ddpm ${LAYOUT[@]+"${LAYOUT[@]}"} --compile_mode reduce-overhead
    bench adamw_foreach 100 --batch_size "$BATCH" --compile ddpm ${LAYOUT[@]+"${LAYOUT[@]}"} --adamw foreach
    bench batch_256 120 --batch_size 256 --compile ddpm ${LAYOUT[@]+"${LAYOUT[@]}"}
    bench max_autotune 240 --batch_size "$BATCH" --compile ddpm ${LAYOUT[@]+"${LAYOUT[@]}"} --compile_mode max-autotune-no-cudagraphs
fi

part "done"
for table in "$OUT"/*.md; do echo "--- $table"; cat "$table"; done
cat "$OUT/loop.txt" 2> /dev/null
