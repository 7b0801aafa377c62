#!/usr/bin/env bash
# Every GPU check of the speed work in one run, sized for a short lease on one H100/H200 (~9 minutes):
#   1. benchmark.py, tutorial UNet at 128, bf16 autocast, eager: ddpm against diffusers
#   2. train.py, 200 steps at 128 on the built-in data, bf16, EMA: the whole loop against the model-only number
#   3. torchrun (NCCL), the same run: SIGTERM -> checkpoint and exit 0, then resume, SIGTERM again
#   4. benchmark.py as 1 with --compile (training only: each measurement compiles anew); 5. train.py as 2 with --compile; 6. benchmark.py as 1 with --channels_last
# The CIFAR-10 UNet (issue 9), batch 128, bf16 (the cifar10-32 preset's default on a GPU), built-in data at 32 px:
#   7. train_step_gpu.py: the model step eager, compiled, reduce-overhead, and as one CUDA graph (eager, compiled)
#   8. train.py --preset cifar10-32, $CIFAR_STEPS steps: eager, --cuda_graph, --compile --cuda_graph and --compile:
#      the whole loop, images on the GPU (--device_data)
#   9. torchrun --nproc_per_node=1, the eager run, right after the plain one: DDP's overhead on the same card
#   10. the CUDA tests: device batches equal the CPU DataLoader's, no host synchronisation between logging steps,
#      --cuda_graph trains as without and resumes exactly
# Measured on an H100 on 2026-11-28 (docs/benchmarks.md): 7 (but reduce-overhead), 8 and 9 without --cuda_graph,
# 10 without the --cuda_graph tests. The next lease: PARTS="cifar_loop cifar_tests" CIFAR_STEPS=300 (~8 minutes).
# Usage: OUT=results-dir bash benchmarks/gpu_check.sh   (diffusers must be importable: see the lease's wheels)
# PARTS picks groups (default all): tutorial (1-6, ~9 min), cifar_step (7, at most 9.5 min),
# cifar_loop (8-9, ~7 min at 300 steps), cifar_tests (10), e.g. PARTS="cifar_step cifar_tests" bash benchmarks/gpu_check.sh
# Each part has its own time limit, so a slow one does not cost the rest; logs go to $OUT.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/benchmark.py imports ddpm from the checkout
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
BATCH=${BATCH:-64}
CIFAR_STEPS=${CIFAR_STEPS:-500}  # train.py steps of each CIFAR loop run (8, 9)
VARIANTS=${VARIANTS:-eager,compile,compile_reduce_overhead,cuda_graph,compile_cuda_graph}  # train_step_gpu.py's (7)
VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-110}  # seconds each of them may take, compiling included
PARTS=${PARTS:-"tutorial cifar_step cifar_loop cifar_tests"}
want() { [[ " $PARTS " == *" $1 "* ]]; }
TRAIN=(train.py --preset butterflies-128 --builtin_data --mixed_precision bf16 --train_batch_size "$BATCH"
       --use_ema --dataloader_num_workers 4 --logging_steps 10 --ddpm_num_inference_steps 20
       --checkpointing_steps 100000)

part() { echo; echo "=== $(date +%T) $1"; }

# Median images/s of train.py's 10-step windows after the first 50 steps (compiling, cuDNN set-up), from TensorBoard.
loop_rate() {
    python3 - "$1" <<'EOF'
import statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
events = EventAccumulator(sys.argv[1] + "/logs").Reload()
rates = [e.value for e in events.Scalars("train/images_per_s") if e.step > 50]
print(f"train.py {sys.argv[1]}: median {statistics.median(rates):.1f} images/s over {len(rates)} windows of 10 "
      f"steps after step 50 (min {min(rates):.1f}, max {max(rates):.1f})")
EOF
}

part "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"

if want tutorial; then
part "1. benchmark, eager bf16, batch $BATCH"
timeout 150 python3 benchmarks/benchmark.py --config tutorial128 --device cuda --dtype bf16 --batch_size "$BATCH" \
    --repeats 5 --train_steps 3 --forward_steps 5 --sample_steps 10 --profile 15 --markdown "$OUT/eager.md" 2>&1 | tee "$OUT/eager.log"

part "2. train.py, eager, 200 steps"
timeout 120 python3 "${TRAIN[@]}" --max_train_steps 200 --output_dir /tmp/loop-eager > /tmp/loop-eager.log 2>&1
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
timeout 240 python3 benchmarks/benchmark.py --config tutorial128 --device cuda --dtype bf16 --batch_size "$BATCH" \
    --repeats 5 --train_steps 3 --measure train --compile \
    --markdown "$OUT/compiled.md" 2>&1 | tee "$OUT/compiled.log" | grep -v Warning

part "5. train.py, compiled, 200 steps"
timeout 150 python3 "${TRAIN[@]}" --max_train_steps 200 --compile --output_dir /tmp/loop-compiled \
    > /tmp/loop-compiled.log 2>&1
echo "exit code $?"; tail -c 500 /tmp/loop-compiled.log; echo
loop_rate /tmp/loop-compiled | tee -a "$OUT/loop.txt"

part "6. benchmark, eager bf16 channels_last, batch $BATCH"
timeout 90 python3 benchmarks/benchmark.py --config tutorial128 --device cuda --dtype bf16 --batch_size "$BATCH" \
    --repeats 5 --train_steps 3 --forward_steps 5 --measure train,forward --channels_last \
    --markdown "$OUT/channels_last.md" 2>&1 | tee "$OUT/channels_last.log"
fi

CIFAR=(train.py --preset cifar10-32 --builtin_data --max_train_steps "$CIFAR_STEPS" --logging_steps 10
       --checkpointing_steps 100000 --save_images_epochs 100000 --save_model_epochs 100000
       --eval_batch_size 16 --ddpm_num_inference_steps 20)

if want cifar_step; then
    part "7. train_step_gpu.py: CIFAR UNet, batch 128, bf16, each variant at most $VARIANT_TIMEOUT s"
    timeout 570 python3 benchmarks/train_step_gpu.py --variants "$VARIANTS" --variant_timeout "$VARIANT_TIMEOUT" \
        --markdown "$OUT/cifar-step.md" 2>&1 \
        | tee "$OUT/cifar-step.log" | grep -v Warning
fi

if want cifar_loop; then
    part "8. train.py --preset cifar10-32 --builtin_data, $CIFAR_STEPS steps: eager, DDP, --cuda_graph, both compiled"
    # 9. torchrun --nproc_per_node=1 right after the plain eager run, so that DDP's overhead compares neighbours
    for mode in eager ddp graph compiled_graph compiled; do
        launch=(python3); extra=()
        case $mode in
            ddp) launch=(torchrun --standalone --nproc_per_node=1) ;;
            graph) extra=(--cuda_graph) ;;
            compiled_graph) extra=(--compile --cuda_graph) ;;
            compiled) extra=(--compile) ;;
        esac
        rm -rf /tmp/cifar-$mode
        timeout 180 "${launch[@]}" "${CIFAR[@]}" "${extra[@]}" --output_dir /tmp/cifar-$mode > /tmp/cifar-$mode.log 2>&1
        echo "$mode: exit code $?"; grep -aE "parameters|rror" /tmp/cifar-$mode.log | head -3
        loop_rate /tmp/cifar-$mode | tee -a "$OUT/cifar-loop.txt"
    done
    python3 - <<'EOF2' | tee -a "$OUT/cifar-loop.txt"
import statistics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
rate = {run: statistics.median(e.value for e in EventAccumulator(f"/tmp/cifar-{run}/logs").Reload()
                               .Scalars("train/images_per_s") if e.step > 50) for run in ("eager", "ddp")}
print(f"DDP overhead (torchrun --nproc_per_node=1 against a plain run, eager, same card): "
      f"{100 * (1 - rate['ddp'] / rate['eager']):.1f}% ({rate['ddp']:.1f} against {rate['eager']:.1f} images/s)")
EOF2
fi

if want cifar_tests; then
    part "10. CUDA tests: device data, no host synchronisation between logging steps"
    timeout 180 python3 -m pytest -q -rs tests/test_device_data.py tests/test_train.py tests/test_cuda_graph_step.py \
        -k "cuda or wait_for_the_gpu or graph" 2>&1 | tail -5 | tee "$OUT/cuda-tests.txt"
fi

part "done"
cat "$OUT"/*.md "$OUT"/*.txt
