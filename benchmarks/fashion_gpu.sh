#!/usr/bin/env bash
# Fashion-MNIST on one GPU (issue 15): the fashion-mnist preset trained for about TRAIN_S seconds, its grids and
# loss, and bits/dim on the test split. The lent machine has no network: the IDX files travel with the checkout.
#   here, once:  mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
#                echo /.data/ >> "$(git rev-parse --git-dir)/info/exclude"     (then carry .data in the run)
#   there:       OUT=results bash benchmarks/fashion_gpu.sh       (TRAIN_S=600 EVAL_S=300 NUM_IMAGES=10000 BATCH=128)
# 1. 100 steps of the preset (batch 128, fp32, EMA) timed: its steps/s on this card, after the first 30
# 2. the run: as many steps as fill TRAIN_S at that rate, so the cosine schedule ends with the run; grids and
#    pipeline every 10 epochs and at the end; copied to $OUT/run (pipeline, grids, TensorBoard logs)
# 3. evaluate.py on the test split: 1,000 images, then NUM_IMAGES (the whole 10,000 by default), each at most EVAL_S s
# Back here: python docs/fashion-mnist/figures.py OUT/run docs/fashion-mnist/gpu  (grid and loss curve)
set -u
OUT=${OUT:-fashion-results}
DATA=${DATA:-.data/fashion-mnist}
TRAIN_S=${TRAIN_S:-600}
EVAL_S=${EVAL_S:-300}
NUM_IMAGES=${NUM_IMAGES:-10000}
BATCH=${BATCH:-128}  # the preset's
EXTRA=${EXTRA:-}  # more train.py flags, e.g. for a CPU smoke test: EXTRA="--ddpm_num_inference_steps 10"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PRESET=(train.py --preset fashion-mnist --train_data_dir "$DATA" --train_batch_size "$BATCH" --logging_steps 10 $EXTRA)

part() { echo; echo "=== $(date +%T) $1"; }

part "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

part "1. 100 timed steps"
timeout 180 python3 "${PRESET[@]}" --max_train_steps 100 --output_dir /tmp/fashion-timing --use_ema \
    --save_images_epochs 100000 --save_model_epochs 100000 --checkpointing_steps 100000 > "$OUT/timing.log" 2>&1
echo "exit code $?"
STEPS=$(python3 - /tmp/fashion-timing "$TRAIN_S" "$BATCH" <<'EOF'
import statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
events = EventAccumulator(sys.argv[1] + "/logs").Reload()
rate = statistics.median(e.value for e in events.Scalars("train/images_per_s") if e.step > 30) / int(sys.argv[3])
print(f"{rate:.1f} steps/s after step 30 (batch {sys.argv[3]})", file=sys.stderr)
print(int(rate * float(sys.argv[2]) * 0.9) // 100 * 100)  # 10% left for start-up, grids and saves
EOF
)
echo "steps for $TRAIN_S s: $STEPS"
[ -n "$STEPS" ] && [ "$STEPS" -gt 0 ] || { echo "no rate measured: see $OUT/timing.log"; tail -5 "$OUT/timing.log"; exit 1; }

part "2. the run: $STEPS steps"
start=$(date +%s)
timeout $((TRAIN_S * 3 / 2)) python3 "${PRESET[@]}" --max_train_steps "$STEPS" --output_dir /tmp/fashion-gpu \
    --checkpointing_steps 100000 > "$OUT/train.log" 2>&1
echo "exit code $?; $(( $(date +%s) - start )) s from start to exit"
tail -c 400 "$OUT/train.log"; echo
mkdir -p "$OUT/run"
cp -r /tmp/fashion-gpu/{unet,scheduler,model_index.json,samples,logs,README.md} "$OUT/run/" 2>/dev/null
ls "$OUT/run"

# 1,000 images first: a figure that surely fits; then NUM_IMAGES (evaluate.py writes only when it ends)
for count in 1000 "$NUM_IMAGES"; do
    plot=(); python3 -c "import matplotlib" 2>/dev/null && plot=(--plot "$OUT/bpd-$count.png")  # not in every image
    part "3. bits/dim of $count test images, at most $EVAL_S s"
    start=$(date +%s)
    timeout "$EVAL_S" python3 evaluate.py /tmp/fashion-gpu --train_data_dir "$DATA" --split test \
        --num_images "$count" --batch_size 1000 --output_json "$OUT/bpd-$count.json" "${plot[@]}" \
        > "$OUT/evaluate-$count.log" 2>&1
    echo "exit code $?; $(( $(date +%s) - start )) s"
    tail -c 300 "$OUT/evaluate-$count.log"; echo
done
