#!/usr/bin/env bash
# Every GPU check of the speed work in one run, sized for a short lease on one H100/H200 (~9 minutes):
#   1. benchmark.py, tutorial UNet at 128, bf16 autocast, eager: ddpm against diffusers
#   2. train.py, 200 steps at 128 on the built-in data, bf16, EMA: the whole loop against the model-only number
#   3. torchrun (NCCL), the same run: SIGTERM -> checkpoint and exit 0, then resume, SIGTERM again
#   4. benchmark.py as 1 with --compile (training only: each measurement compiles anew); 5. train.py as 2 with --compile; 6. benchmark.py as 1 with --channels_last
# Usage: OUT=results-dir bash benchmarks/gpu_check.sh   (diffusers must be importable: see the lease's wheels)
# Each part has its own time limit, so a slow one does not cost the rest; logs go to $OUT.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/benchmark.py imports ddpm from the checkout
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
BATCH=${BATCH:-64}
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

part "done"
cat "$OUT"/*.md "$OUT/loop.txt"
