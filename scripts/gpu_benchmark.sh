#!/usr/bin/env bash
# One prepared GPU check (README, "Performance"): ResNet-50 224x224 bf16 and the study's CNN train
# img/s on the card, and the host input pipeline rate. Usage: OUT=dir bash scripts/gpu_benchmark.sh
# Packages missing on the machine can be installed first from wheels in .whl/ (see the device notes).
set -uo pipefail
OUT=${OUT:-runs/gpu_benchmark}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
bench() {  # name, timeout, args...  (ONLY="name ..." runs a subset)
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name"
  timeout "$limit" python3 scripts/benchmark.py "$@" 2>"$OUT/$name.err" | tee -a "$OUT/bench.jsonl" \
    || { echo "$name failed:"; tail -5 "$OUT/$name.err"; }
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
