#!/usr/bin/env bash
# The GPU check (issue 36): one command for a short GPU lease, at most $BUDGET seconds of wall time (default 480),
# its parts in order of value, each under its own time limit cut to what is left of the budget, so that one part
# that hangs costs its own limit and no more. Everything written goes into $OUT/results.tar.gz at the exit, however
# it comes. How to run it, and what to carry to a machine without network: benchmarks/README.md.
#   tests     the GPU tests (python -m pytest): device batches, --cuda_graph training and resume, FastUNet, the
#             sampling noise's copy, the fast norm
#   cifar     train.py --preset cifar10-32 --builtin_data --cuda_graph, $CIFAR_STEPS steps each: eager (graph), then
#             the same under python -m torch.distributed.run --nproc_per_node=1 (DDP over NCCL inside the graph: its
#             overhead on one card), then compiled (compiled_graph); images/s from TensorBoard, the final grid's rate
#   tutorial  benchmark.py: the diffusers tutorial UNet at 128, batch 64, bf16, both compiled, ddpm against diffusers
#             (skipped where diffusers is not installed)
#   sampling  sampling_gpu.py: ddpm's generate() eager against FastUNet (CUDA graph, bf16), and DDPMPipeline
#   fast_norm the compiled CIFAR graph run again with --fast_norm (decides whether it becomes a GPU default)
# Not in the default PARTS, for a later lease: step (train_step_gpu.py, the model step's variants, ~9 min),
# speed2 (benchmark.py's fast paths of the tutorial UNet, ~10 min), fashion (the fashion-mnist preset for
# $FASHION_MINUTES minutes and the bits/dim of $FASHION_IMAGES test images; needs .data/fashion-mnist carried).
# DRY=1 runs every part on this CPU, small, to check the command itself: what has no CPU form (--cuda_graph,
# compiling, which takes minutes on 2 cores) is left out and the part says so.
set -u
OUT=${OUT:-gpu-results}
BUDGET=${BUDGET:-480}
DRY=${DRY:-0}
PY=${PY:-python3}
PARTS=${PARTS:-"tests cifar tutorial sampling fast_norm"}
CIFAR_STEPS=${CIFAR_STEPS:-200}
FASHION_MINUTES=${FASHION_MINUTES:-4}
GRACE=40  # seconds from SIGTERM to SIGKILL: torch.distributed.run gives its workers 30 to stop
WORK=$(mktemp -d)  # run folders; what is worth keeping is copied into $OUT
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# At the exit: one archive of all that $OUT holds (the device tool brings back few files).
pack() {
    (cd "$OUT" && find . -type f ! -name results.tar.gz -print0 | tar -czf results.tar.gz --null -T - --remove-files \
        && find . -mindepth 1 -type d -empty -delete && ls -l results.tar.gz)
    rm -rf "$WORK"
}
trap pack EXIT
# stopped from outside: stop the part running (see run), then pack all the same
trap 'note "stopped from outside at ${SECONDS}s"; [ -n "${CHILD:-}" ] && kill -TERM "$CHILD"; wait; exit 143' TERM INT

part() { echo; echo "=== $(date +%T), ${SECONDS}s of ${BUDGET}s: $*"; }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }

# Seconds the next command may run: its own limit, or what is left of $BUDGET once its SIGKILL grace and the packing
# are set aside (0: too little to start it).
limit() {
    local left=$((BUDGET - SECONDS - GRACE - 10))
    if [ "$left" -lt 20 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# run NAME LIMIT COMMAND...: COMMAND, its output in $OUT/NAME.log, SIGTERM at its limit and SIGKILL $GRACE s later
# (timeout signals the command's whole process group). A command stopped so leaves nothing running on the GPU.
# Returns 125 if skipped.
FAILED=0
run() {
    local name=$1 seconds start code; seconds=$(limit "$2"); shift 2
    if [ "$seconds" = 0 ]; then note "$name: skipped, ${SECONDS}s of the ${BUDGET}s budget spent"; return 125; fi
    start=$SECONDS
    timeout -k "$GRACE" "$seconds" "$@" > "$OUT/$name.log" 2>&1 &  # waited for: a signal to this script is not
    CHILD=$!                                                           # held until the part ends
    wait "$CHILD"
    code=$?
    CHILD=
    note "$name: exit $code after $((SECONDS - start))s (limit ${seconds}s)$([ $code = 124 ] || [ $code = 137 ] \
        && echo ', stopped at its limit')"
    if [ $code != 0 ]; then
        FAILED=$((FAILED + 1))
        tr '\r' '\n' < "$OUT/$name.log" | grep -av "it/s\]\|s/it\]" | tail -n 20
    fi
    if [ $code = 124 ] || [ $code = 137 ]; then
        command -v nvidia-smi > /dev/null \
            && nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9  # this command's own
    fi
    return $code
}

# Median images/s of train.py's 10-step windows after step 50 (compiling, cuDNN's set-up), from its TensorBoard log.
loop_rate() {
    "$PY" - "$1" "$2" <<'EOF' | tee -a "$OUT/summary.txt"
import os, statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
name, logs = sys.argv[1], sys.argv[2]
events = EventAccumulator(logs).Reload() if os.path.isdir(logs) else None
rates = ([e.value for e in events.Scalars("train/images_per_s") if e.step > 50]
         if events and "train/images_per_s" in events.Tags()["scalars"] else [])
print(f"{name}: median {statistics.median(rates):.1f} images/s over {len(rates)} windows of 10 steps after step 50 "
      f"(min {min(rates):.1f}, max {max(rates):.1f})" if rates else f"{name}: no 10-step window after step 50")
EOF
}

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    # the preset's 35.7M-parameter UNet takes a minute a step on 2 shared cores: a tiny one instead
    tiny='"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
          "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8'
    echo "{$tiny}" > "$WORK/tiny.json"
    echo "{$tiny, \"in_channels\": 1, \"out_channels\": 1}" > "$WORK/tiny-gray.json"
    CIFAR=(train.py --preset cifar10-32 --builtin_data --device cpu --model_config_name_or_path "$WORK/tiny.json"
           --max_train_steps 12 --train_batch_size 4 --eval_batch_size 2 --ddpm_num_inference_steps 2
           --dataloader_num_workers 0 --logging_steps 4 --checkpointing_steps 100000 --save_images_epochs 100000
           --save_model_epochs 100000)
    GRAPH=() COMPILE=()  # --cuda_graph needs a GPU; compiling takes minutes on a CPU
else
    DEVICE=cuda
    CIFAR=(train.py --preset cifar10-32 --builtin_data --max_train_steps "$CIFAR_STEPS" --logging_steps 10
           --checkpointing_steps 100000 --save_images_epochs 100000 --save_model_epochs 100000
           --eval_batch_size 64 --ddpm_num_inference_steps 100)
    GRAPH=(--cuda_graph) COMPILE=(--compile)
    if compgen -G ".whl/*.whl" > /dev/null; then  # the wheels carried for a machine without network
        "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" .whl/*.whl \
            && PYTHONPATH="$WORK/site:$PYTHONPATH"
    fi
fi
INSTALLED=" "  # the optional modules importable here, each between spaces
for module in diffusers pytest; do
    if "$PY" -c "import $module" 2> /dev/null; then INSTALLED+="$module "; fi
done
has() { [[ "$INSTALLED" == *" $1 "* ]]; }

part "machine"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() \
else 'no GPU')" | tee "$OUT/machine.txt"
for module in diffusers pytest; do has $module || note "$module is not installed: what needs it is skipped"; done
note "DRY=$DRY PARTS=$PARTS BUDGET=$BUDGET"

if want tests; then
    part "tests: the GPU tests (their CPU neighbours too: seconds)"
    if has pytest; then
        run tests 150 "$PY" -m pytest -q -rfEs --tb=short -p no:cacheprovider tests/test_device_data.py \
            tests/test_cuda_graph_step.py tests/test_fast_sampling.py tests/test_fast_norm.py tests/test_train.py \
            -k "not test_train.py or cuda or gpu" && tail -n 1 "$OUT/tests.log"
    else note "tests: skipped, pytest is not installed"; fi
fi

# cifar_run NAME LIMIT LAUNCHER... -- FLAGS...: one CIFAR run into $WORK/NAME; its TensorBoard log into $OUT
cifar_run() {
    local name=$1 own=$2 launcher=(); shift 2
    while [ "$1" != -- ]; do launcher+=("$1"); shift; done; shift
    run "cifar-$name" "$own" "${launcher[@]}" "${CIFAR[@]}" "$@" --output_dir "$WORK/$name"
    [ $? = 125 ] && return
    [ -d "$WORK/$name/logs" ] && mkdir -p "$OUT/tensorboard" && cp -r "$WORK/$name/logs" "$OUT/tensorboard/$name"
    loop_rate "$name" "$WORK/$name/logs"
}

if want cifar; then
    part "cifar: train.py --preset cifar10-32 ${GRAPH[*]:-}: eager, under torch.distributed.run, compiled"
    cifar_run graph 90 "$PY" -- ${GRAPH[@]+"${GRAPH[@]}"} --no-compile
    cifar_run ddp_graph 100 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -- \
        ${GRAPH[@]+"${GRAPH[@]}"} --no-compile
    cifar_run compiled_graph 200 "$PY" -- ${GRAPH[@]+"${GRAPH[@]}"} ${COMPILE[@]+"${COMPILE[@]}"}  # cold compile ~100 s
    "$PY" - "$OUT" <<'EOF' | tee -a "$OUT/summary.txt"
import re, sys
from pathlib import Path
out = Path(sys.argv[1])
medians = dict(re.findall(r"^(\S+): median ([0-9.]+) images/s", (out / "summary.txt").read_text(), re.M))
if "graph" in medians and "ddp_graph" in medians:
    ddp, plain = float(medians["ddp_graph"]), float(medians["graph"])
    print(f"DDP's overhead on one card (torch.distributed.run --nproc_per_node=1 against a plain run, both eager "
          f"graphs): {100 * (1 - ddp / plain):.1f}% ({ddp:.1f} against {plain:.1f} images/s)")
for log in sorted(out.glob("cifar-*.log")):  # the last sampling bar: the final grid, 64 images
    bars = re.findall(r"sampling: +\d+%[^\r\n]*?, +([0-9.]+)(s/it|it/s)\]", log.read_text(errors="replace"))
    if bars:
        rate = float(bars[-1][0]) if bars[-1][1] == "it/s" else 1 / float(bars[-1][0])
        print(f"{log.stem}: final grid at {rate:.1f} steps/s (the preset's 1,000-step grid: {1000 / rate:.0f} s)")
EOF
fi

if want tutorial; then
    part "tutorial: benchmark.py, the tutorial UNet, ddpm against diffusers"
    if ! has diffusers; then note "tutorial: skipped, diffusers is not installed"
    elif [ "$DRY" = 1 ]; then  # the small UNet, eager: compiling both models takes minutes on a CPU
        run tutorial 120 "$PY" benchmarks/benchmark.py --config small --device cpu --batch_size 2 --repeats 1 \
            --train_steps 1 --measure train --markdown "$OUT/tutorial.md"
    else
        run tutorial 240 "$PY" benchmarks/benchmark.py --config tutorial128 --device cuda --dtype bf16 --batch_size 64 \
            --repeats 3 --train_steps 3 --measure train --compile --markdown "$OUT/tutorial.md"
    fi
fi

if want sampling; then
    part "sampling: sampling_gpu.py, generate() eager against FastUNet"
    if [ "$DRY" = 1 ]; then run sampling 90 "$PY" benchmarks/sampling_gpu.py --quick
    else run sampling 150 "$PY" benchmarks/sampling_gpu.py --budget_s 3; fi
    [ -f "$OUT/sampling.log" ] && grep -a "^|\|; torch" "$OUT/sampling.log"
fi

if want fast_norm; then
    part "fast_norm: the compiled CIFAR graph run with --fast_norm"
    cifar_run compiled_graph_fast_norm 200 "$PY" -- ${GRAPH[@]+"${GRAPH[@]}"} ${COMPILE[@]+"${COMPILE[@]}"} --fast_norm
fi

if want step; then
    part "step: train_step_gpu.py, the CIFAR UNet's model step, batch 128, bf16"
    if [ "$DRY" = 1 ]; then run step 240 "$PY" benchmarks/train_step_gpu.py --quick --markdown "$OUT/step.md"
    else run step 570 "$PY" benchmarks/train_step_gpu.py --variant_timeout 110 --markdown "$OUT/step.md"; fi
fi

if want speed2; then
    part "speed2: benchmark.py's fast paths, the tutorial UNet at 128 (ddpm compiled; diffusers eager unless said)"
    if ! has diffusers; then note "speed2: skipped, diffusers is not installed"; else
        run norm_fusion 120 "$PY" benchmarks/norm_fusion.py --device "$DEVICE"
        bench=("$PY" benchmarks/benchmark.py --config tutorial128 --device "$DEVICE" --dtype bf16 --measure train
               --repeats 5 --train_steps 3 --batch_size 64)
        [ "$DRY" = 1 ] && bench=("$PY" benchmarks/benchmark.py --config small --device cpu --dtype bf16 --measure train
                                 --repeats 1 --train_steps 1 --batch_size 2)
        run speed2-eager_fast_norm 100 "${bench[@]}" --fast_norm --markdown "$OUT/speed2-eager_fast_norm.md"
        run speed2-channels_last 150 "${bench[@]}" --compile ddpm --channels_last --force_layout_opt \
            --markdown "$OUT/speed2-channels_last.md"
        run speed2-fast_norm 150 "${bench[@]}" --compile ddpm --fast_norm --markdown "$OUT/speed2-fast_norm.md"
        run speed2-profile 150 "${bench[@]}" --compile ddpm --batch_size 128 --profile 30 \
            --markdown "$OUT/speed2-profile.md"
    fi
fi

if want fashion; then
    part "fashion: the fashion-mnist preset for $FASHION_MINUTES minutes, then its bits/dim on the test split"
    data=.data/fashion-mnist
    if [ ! -d "$data" ]; then note "fashion: skipped, $data is not here (benchmarks/README.md: carry it)"; else
        minutes=$FASHION_MINUTES extra=()
        [ "$DRY" = 1 ] && minutes=0.2 extra=(--device cpu --model_config_name_or_path "$WORK/tiny-gray.json"
                                             --ddpm_num_inference_steps 2 --dataloader_num_workers 0)
        run fashion-train $((${minutes%.*} * 60 + 120)) "$PY" train.py --preset fashion-mnist --train_data_dir "$data" \
            --max_train_minutes "$minutes" --logging_steps 10 --checkpointing_steps 100000 ${extra[@]+"${extra[@]}"} \
            --output_dir "$WORK/fashion"
        mkdir -p "$OUT/fashion"  # what docs/fashion-mnist/figures.py reads: the grids and the TensorBoard log
        cp -r "$WORK/fashion/samples" "$WORK/fashion/logs" "$WORK/fashion/README.md" "$OUT/fashion/" 2> /dev/null
        images=${FASHION_IMAGES:-1000}; [ "$DRY" = 1 ] && images=8 extra=(--device cpu)
        run fashion-bpd 240 "$PY" evaluate.py "$WORK/fashion" --train_data_dir "$data" --split test \
            --num_images "$images" --batch_size 1000 --output_json "$OUT/fashion/bpd.json" ${extra[@]+"${extra[@]}"}
        tail -c 300 "$OUT/fashion-bpd.log"; echo
    fi
fi

part "done in ${SECONDS}s, $FAILED part(s) failed"
cat "$OUT/summary.txt"
for table in "$OUT"/*.md; do [ -f "$table" ] && { echo "--- $table"; cat "$table"; }; done
[ "$FAILED" = 0 ]
