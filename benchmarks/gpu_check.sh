#!/usr/bin/env bash
# Every GPU check of the speed work in one run, sized for a short lease on one H100/H200, within $BUDGET seconds:
#   1. benchmark.py, tutorial UNet at 128, bf16 autocast, eager: ddpm against diffusers
#   2. train.py, 200 steps at 128 on the built-in data, bf16, EMA: the whole loop against the model-only number
#   3. torchrun (NCCL), the same run: SIGTERM -> checkpoint and exit 0, then resume, SIGTERM again
#   4. benchmark.py as 1 with --compile (training only: each measurement compiles anew); 5. train.py as 2 with --compile; 6. benchmark.py as 1 with --channels_last
# The CIFAR-10 UNet (issue 9), batch 128, bf16 (the cifar10-32 preset's default on a GPU), built-in data at 32 px:
#   7. train_step_gpu.py: the model step eager, compiled, reduce-overhead, and as one CUDA graph (eager, compiled)
#   8. the CUDA tests: device batches equal the CPU DataLoader's, no host synchronisation between logging steps,
#      --cuda_graph trains as without, resumes exactly, and under torchrun records DDP's all-reduce
#   9. train.py --preset cifar10-32, $CIFAR_STEPS steps, each of $CIFAR_RUNS: the whole loop, images on the GPU
#      (--device_data); a run named ddp_X is X under torchrun --nproc_per_node=1, right after X: DDP's overhead on
#      the same card. Each run ends with a grid of the preset's 64 images (100 steps): its sampling rate gives the
#      cost of the preset's grids (1,000 steps every 10 epochs) against the training between them.
#   10. benchmarks/speed2_gpu.sh (issue 10: the tutorial UNet's fast paths) with what is left of $BUDGET: after the
#       default runs, little or nothing in one call; PARTS=speed2 gives it a call of its own
# Measured on an H100 on 2026-11-28 (docs/benchmarks.md): 7 (but reduce-overhead), 8 without the --cuda_graph
# tests, 9 eager, compiled and ddp_eager. The next lease runs the default PARTS ("cifar_tests cifar_loop speed2":
# the tests of --cuda_graph, whose results say whether the numbers after them mean anything, then the 5,400
# images/s goal's runs, then issue 10) within BUDGET seconds (default 540, for a call of the device tool, which
# allows 600; lower it to what the lease has left). Everything written comes back as $OUT/results.tar.gz:
#   OUT=results-dir BUDGET=540 bash benchmarks/gpu_check.sh   (diffusers must be importable: the lease's wheels)
# The device machine has no diffusers: fetch its wheels here (`pip download --no-deps diffusers==0.42.1
# importlib_metadata -d .whl`, .whl in .git/info/exclude), carry .whl, and begin the device command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# PARTS picks groups, run in this order: tutorial (1-6, ~9 min), cifar_step (7, at most 9.5 min), cifar_tests (8,
# ~2 min), cifar_loop (9, ~6 min at 300 steps and the default runs), speed2 (10, up to 8 min); PARTS=all runs all
# but speed2.
# Each command has its own time limit, cut to what is left of $BUDGET (one that would get under 30 s is skipped
# and says so), but part 3's two 25-s runs; logs go to $OUT.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/benchmark.py imports ddpm from the checkout
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
BATCH=${BATCH:-64}
BUDGET=${BUDGET:-540}  # within the device tool's 600 s per call
CIFAR_STEPS=${CIFAR_STEPS:-300}  # train.py steps of each CIFAR loop run (9)
# each one of eager, compiled, graph, compiled_graph; ddp_ before it: under torchrun; +flag after it: --flag too
CIFAR_RUNS=${CIFAR_RUNS:-"compiled_graph ddp_compiled_graph compiled_graph+channels_last compiled_graph+fast_norm"}
VARIANTS=${VARIANTS:-eager,compile,compile_reduce_overhead,cuda_graph,compile_cuda_graph}  # train_step_gpu.py's (7)
VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-110}  # seconds each of them may take, compiling included
PARTS=${PARTS:-"cifar_tests cifar_loop speed2"}
[ "$PARTS" = all ] && PARTS="tutorial cifar_step cifar_tests cifar_loop"
want() { [[ " $PARTS " == *" $1 "* ]]; }

# The device tool brings back at most 8 files from its $OUT: at the exit, however it comes, every log, table and the
# CIFAR runs' TensorBoard logs go into one archive, $OUT/results.tar.gz (tar -xzf results.tar.gz)
pack_results() {
    for run in $CIFAR_RUNS; do [ -d "/tmp/cifar-$run/logs" ] && mkdir -p "$OUT/tensorboard" \
        && cp -r "/tmp/cifar-$run/logs" "$OUT/tensorboard/${run//+/_}"; done
    (cd "$OUT" && find . -type f ! -name results.tar.gz -print0 | tar -czf results.tar.gz --null -T - --remove-files \
        && find . -mindepth 1 -type d -empty -delete && ls -l results.tar.gz)
}
trap pack_results EXIT
TRAIN=(train.py --preset butterflies-128 --builtin_data --mixed_precision bf16 --train_batch_size "$BATCH"
       --use_ema --dataloader_num_workers 4 --logging_steps 10 --ddpm_num_inference_steps 20
       --checkpointing_steps 100000)

part() { echo; echo "=== $(date +%T), ${SECONDS}s in: $1"; }

# Seconds for the next command: its own limit, or what is left of $BUDGET if less (0: skip it).
limit() {
    local left=$((BUDGET - SECONDS - 20))
    if [ "$left" -lt 30 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# budgeted OWN COMMAND...: the command under limit OWN (SIGTERM, then SIGKILL 20 s later), or skipped (exit 124).
budgeted() {
    local seconds; seconds=$(limit "$1"); shift
    if [ "$seconds" = 0 ]; then echo "skipped: the budget of ${BUDGET}s is spent" >&2; return 124; fi
    timeout -k 20 "$seconds" "$@"
}

# Median images/s of train.py's 10-step windows after the first 50 steps (compiling, cuDNN set-up), from TensorBoard.
loop_rate() {
    python3 - "$1" <<'EOF'
import os, statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
events = EventAccumulator(sys.argv[1] + "/logs").Reload() if os.path.isdir(sys.argv[1] + "/logs") else None
rates = ([e.value for e in events.Scalars("train/images_per_s") if e.step > 50]
         if events and "train/images_per_s" in events.Tags()["scalars"] else [])
if rates:
    print(f"train.py {sys.argv[1]}: median {statistics.median(rates):.1f} images/s over {len(rates)} windows of 10 "
          f"steps after step 50 (min {min(rates):.1f}, max {max(rates):.1f})")
else:
    print(f"train.py {sys.argv[1]}: no 10-step window after step 50")
EOF
}

part "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"

if want tutorial; then
part "1. benchmark, eager bf16, batch $BATCH"
budgeted 150 python3 benchmarks/benchmark.py --config tutorial128 --device cuda --dtype bf16 --batch_size "$BATCH" \
    --repeats 5 --train_steps 3 --forward_steps 5 --sample_steps 10 --profile 15 --markdown "$OUT/eager.md" 2>&1 | tee "$OUT/eager.log"

part "2. train.py, eager, 200 steps"
budgeted 120 python3 "${TRAIN[@]}" --max_train_steps 200 --output_dir /tmp/loop-eager > /tmp/loop-eager.log 2>&1
echo "exit code $?"; tail -c 500 /tmp/loop-eager.log; echo
loop_rate /tmp/loop-eager | tee "$OUT/loop.txt"

part "3. torchrun NCCL: SIGTERM, resume, SIGTERM"
for attempt in first resumed; do
    resume=(); [ $attempt = resumed ] && resume=(--resume_from_checkpoint latest)
    torchrun --standalone --nproc_per_node=1 "${TRAIN[@]}" --max_train_steps 100000 --output_dir /tmp/loop-ddp \
        "${resume[@]}" > "/tmp/ddp-$attempt.log" 2>&1 &
    launcher=$!
    sleep 25
    kill -TERM $launcher
    wait $launcher
    echo "$attempt run: exit code $?"
    grep -E "resumed from|stop signal|saved|rror" "/tmp/ddp-$attempt.log" | tail -4
done
ls /tmp/loop-ddp
loop_rate /tmp/loop-ddp | tee -a "$OUT/loop.txt"

part "4. benchmark, compiled bf16, batch $BATCH"
budgeted 240 python3 benchmarks/benchmark.py --config tutorial128 --device cuda --dtype bf16 --batch_size "$BATCH" \
    --repeats 5 --train_steps 3 --measure train --compile \
    --markdown "$OUT/compiled.md" 2>&1 | tee "$OUT/compiled.log" | grep -v Warning

part "5. train.py, compiled, 200 steps"
budgeted 150 python3 "${TRAIN[@]}" --max_train_steps 200 --compile --output_dir /tmp/loop-compiled \
    > /tmp/loop-compiled.log 2>&1
echo "exit code $?"; tail -c 500 /tmp/loop-compiled.log; echo
loop_rate /tmp/loop-compiled | tee -a "$OUT/loop.txt"

part "6. benchmark, eager bf16 channels_last, batch $BATCH"
budgeted 90 python3 benchmarks/benchmark.py --config tutorial128 --device cuda --dtype bf16 --batch_size "$BATCH" \
    --repeats 5 --train_steps 3 --forward_steps 5 --measure train,forward --channels_last \
    --markdown "$OUT/channels_last.md" 2>&1 | tee "$OUT/channels_last.log"
fi

CIFAR=(train.py --preset cifar10-32 --builtin_data --max_train_steps "$CIFAR_STEPS" --logging_steps 10
       --checkpointing_steps 100000 --save_images_epochs 100000 --save_model_epochs 100000
       --eval_batch_size 64 --ddpm_num_inference_steps 100)

if want cifar_step; then
    part "7. train_step_gpu.py: CIFAR UNet, batch 128, bf16, each variant at most $VARIANT_TIMEOUT s"
    budgeted 570 python3 benchmarks/train_step_gpu.py --variants "$VARIANTS" --variant_timeout "$VARIANT_TIMEOUT" \
        --markdown "$OUT/cifar-step.md" 2>&1 \
        | tee "$OUT/cifar-step.log" | grep -v Warning
fi

if want cifar_tests; then
    part "8. CUDA tests: device data, no host synchronisation between logging steps, --cuda_graph (torchrun too)"
    # the GPU tests, FastUNet's too (--cuda_graph draws its sample grids through it); the rest are CPU tests
    # -rfEs: the FAILED and ERROR lines and the skips' reasons; the whole output in cuda-tests.log
    budgeted 180 python3 -m pytest -q -rfEs --tb=short tests/test_device_data.py tests/test_train.py \
        tests/test_cuda_graph_step.py tests/test_fast_sampling.py -k "cuda or wait_for_the_gpu or graph" 2>&1 \
        | tee "$OUT/cuda-tests.log" | tail -40
fi

if want cifar_loop; then
    part "9. train.py --preset cifar10-32 --builtin_data, $CIFAR_STEPS steps: $CIFAR_RUNS"
    for run in $CIFAR_RUNS; do
        launch=(python3) extra=() own=120
        [[ $run == ddp_* ]] && launch=(torchrun --standalone --nproc_per_node=1)
        if [[ $run == *compiled* ]]; then extra+=(--compile) own=200  # a cold compile of this UNet took 94 s on an H100
        else extra+=(--no-compile); fi  # the preset compiles on a GPU by itself
        [[ $run == *graph* ]] && extra+=(--cuda_graph)
        IFS=+ read -ra more <<< "${run#*+}"  # compiled_graph+fast_norm+channels_last: more flags
        [[ $run == *+* ]] && extra+=("${more[@]/#/--}")
        rm -rf "/tmp/cifar-$run"
        log="$OUT/cifar-${run//+/_}.log"  # the device tool returns names of letters, digits, '.', '_' and '-' only
        budgeted "$own" "${launch[@]}" "${CIFAR[@]}" "${extra[@]}" --output_dir "/tmp/cifar-$run" > "$log" 2>&1
        code=$?
        echo "$run (${extra[*]}): exit code $code"; grep -aE "parameters|rror|skipped" "$log" | head -3
        [ "$code" != 0 ] && tr '\r' '\n' < "$log" | grep -av "it/s\|s/it" | tail -25  # what went wrong, here
        loop_rate "/tmp/cifar-$run" | tee -a "$OUT/cifar-loop.txt"
    done
    python3 - "$OUT" $CIFAR_RUNS <<'EOF2' | tee -a "$OUT/cifar-loop.txt"
import re, sys
from pathlib import Path
out, runs = Path(sys.argv[1]), sys.argv[2:]
# loop_rate's lines above (the latest of each run)
medians = dict(re.findall(r"train.py /tmp/cifar-(\S+): median ([0-9.]+) images/s", (out / "cifar-loop.txt").read_text()))
rate = lambda run: float(medians[run]) if run in medians else None  # noqa: E731

for run in runs:
    if run.startswith("ddp_") and rate(run) and rate(run[4:]):
        print(f"DDP overhead, {run[4:]} (torchrun --nproc_per_node=1 against a plain run, same card): "
              f"{100 * (1 - rate(run) / rate(run[4:])):.1f}% ({rate(run):.1f} against {rate(run[4:]):.1f} images/s)")
    # the last sampling bar of the run's final grid (64 images, 100 steps): the preset's grid is 1,000 steps
    log = (out / f"cifar-{run.replace('+', '_')}.log").read_text(errors="replace")
    bars = re.findall(r"sampling: +\d+%[^\r\n]*?, ([0-9.]+)(s/it|it/s)\]", log)
    if bars and rate(run):
        steps_per_s = float(bars[-1][0]) if bars[-1][1] == "it/s" else 1 / float(bars[-1][0])
        grid_s, between_s = 1000 / steps_per_s, 10 * 50_000 / rate(run)  # every 10 epochs of CIFAR-10's 50,000
        print(f"{run}: grid of 64 images sampled at {steps_per_s:.1f} steps/s: a preset grid (1,000 steps) "
              f"{grid_s:.1f} s against {between_s:.1f} s of training between grids ({100 * grid_s / (grid_s + between_s):.1f}% of the run)")
EOF2
fi

if want speed2; then
    seconds=$(limit 100000)  # all that is left
    part "10. benchmarks/speed2_gpu.sh (issue 10) within ${seconds}s"
    if [ "$seconds" = 0 ]; then echo "skipped: the budget of ${BUDGET}s is spent"
    else OUT="$OUT/speed2" BUDGET="$seconds" bash benchmarks/speed2_gpu.sh; fi
fi

part "done"
cat "$OUT"/*.md "$OUT"/*.txt 2> /dev/null
