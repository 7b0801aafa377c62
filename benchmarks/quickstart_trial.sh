#!/usr/bin/env bash
# One trial of the quickstart search (docs/quickstart.md): `python train.py` with the flags given, on one thread,
# into trials/NAME, and one line for the table: wall minutes (start-up, training, grids, the final score
# included) and the shapes score of the 256 samples train.py draws at the end.
#   bash benchmarks/quickstart_trial.sh N1 --max_train_steps 3900                 # one trial
#   bash benchmarks/quickstart_trial.sh S1 --seed 1 & bash benchmarks/quickstart_trial.sh S2 --seed 2 & wait
# Two trials side by side use the machine's two cores (one thread each: each runs slower than `python train.py`
# alone on two threads, but two at once give more trials per hour); compare configurations over several seeds:
# single runs vary a lot.
set -u
name=${1:?usage: quickstart_trial.sh NAME [train.py flags...]}; shift
mkdir -p trials
rm -rf "trials/$name"
export OMP_NUM_THREADS=${THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$(date +%s)
python3 train.py --output_dir "trials/$name" "$@" > "trials/$name.log" 2>&1
code=$?
minutes=$(python3 -c "print(f'{($(date +%s) - $start) / 60:.1f}')")
score=$(tr '\r' '\n' < "trials/$name.log" | grep -a "^shapes score of" | tail -1)
echo "$name | $* | exit $code | $minutes min | ${score:-no score: see trials/$name.log}" | tee -a trials/table.txt
