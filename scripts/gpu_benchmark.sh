#!/usr/bin/env bash
# One prepared GPU check (docs/performance.md): ResNet-50 224x224 bf16 and the study's CNN train
# img/s on the card, the host input pipeline rate, then (when CT_DIR names a COVID-CT manual_dir)
# the CT recipe's training job end to end and its test evaluation.
# Usage: OUT=dir [ONLY="name ..."] [CT_DIR=dir] bash scripts/gpu_benchmark.sh
# OUT receives gpu.txt, bench.jsonl (one JSON line per measure) and logs.tar.gz (all logs, the
# end-to-end run's metrics and evaluation, no checkpoints). Packages missing on the machine are
# installed first from wheels in .whl/ (see the device notes); carry only what the machine lacks:
# a flax wheel older than the machine's jax fails on import (flax 0.12.8 with jax 0.11.2).
set -uo pipefail
OUT=${OUT:-runs/gpu_benchmark}
LOGS=${LOGS:-/tmp/gpu_benchmark}
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
selected() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
bench() {  # name, timeout, benchmark.py args...
  local name=$1 limit=$2; shift 2
  selected "$name" || return 0
  echo "== $name"
  timeout "$limit" python3 scripts/benchmark.py "$@" 2>"$LOGS/$name.err" | tee -a "$OUT/bench.jsonl" \
    || { echo "$name failed:"; tail -5 "$LOGS/$name.err"; }
}
train_eval() {  # name, timeout, main args...: the training job, timed, then evaluate on test
  local name=$1 limit=$2; shift 2
  selected "$name" || return 0
  echo "== $name"
  local workdir=$LOGS/runs/$name t0 rc
  t0=$(date +%s%N)
  timeout "$limit" python3 -m covid_flax.main "$@" --config.progress_bar=False \
    --workdir="$workdir" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "{\"measure\": \"end_to_end\", \"name\": \"$name\", \"rc\": $rc," \
    "\"seconds\": $((($(date +%s%N) - t0) / 1000000))e-3, \"args\": \"$*\"}" | tee -a "$OUT/bench.jsonl"
  cat "$workdir/train_summary.json" 2>/dev/null || tail -5 "$LOGS/$name.log"
  [ "$rc" = 0 ] && timeout 120 python3 -m covid_flax.evaluate --workdir="$workdir" \
    >"$LOGS/$name.eval.log" 2>&1 && head -30 "$LOGS/$name.eval.log"
}
bench resnet50_bf16 150 --config=configs/cxr.py --model=resnet50 --image_size=224 --batch_size=256 \
  --config.half_precision=True --steps=20 --windows=5
bench seed_cnn_f32_b32 90 --config=configs/cxr.py --model=seed_cnn --image_size=224 --batch_size=32 \
  --steps=50 --windows=5
bench seed_cnn_bf16_b256 90 --config=configs/cxr.py --model=seed_cnn --image_size=224 \
  --batch_size=256 --config.half_precision=True --steps=20 --windows=5
bench resnet50_f32 150 --config=configs/cxr.py --model=resnet50 --image_size=224 --batch_size=256 \
  --steps=10 --windows=3
bench resnet18_recipe 90 --config=configs/ct.py --model=resnet18 --image_size=128 --batch_size=32 \
  --steps=50 --windows=5
bench input 120 --config=configs/synthetic.py --config.data_dir=/tmp/tfds --image_size=224 \
  --batch_size=256 --model=tiny_cnn --steps=5 --windows=2 --input_split=train
if [ -n "${CT_DIR:-}" ]; then
  train_eval ct_recipe 300 --config=configs/ct.py --config.manual_dir="$CT_DIR" \
    --config.data_dir=/tmp/tfds
fi
tar -czf "$OUT/logs.tar.gz" --exclude=checkpoints -C "$LOGS" .
