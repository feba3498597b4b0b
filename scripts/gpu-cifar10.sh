#!/usr/bin/env bash
# The short real CIFAR-10 run on one GPU, end to end, with the commands README quotes:
# cache (pixels) -> train for STEPS -> sample grid -> reference statistics -> FID-NUM.
# Usage: scripts/gpu-cifar10.sh CIFAR_TRAIN_DIR_OR_TAR OUT_DIR [STEPS] [FID_NUM]
set -euo pipefail
src=$1; out=$2; steps=${3:-4000}; num=${4:-10000}
inception=${INCEPTION:+--inception $INCEPTION}
mkdir -p "$out"
python -m wdmctl cache "$src" --out caches/cifar10-32 --resolution 32 --vae none --device cuda
# a short run: the recipe's 200K-step schedule (2,500 warm-up steps, EMA 0.9999) shortened to STEPS
python -m wdmctl train recipes/cifar10.toml --max-steps "$steps" --set optim.warmup_steps=200 \
    --set optim.lr=4e-4 --set ema.decay=0.999 --set ema.warmup=true --set train.checkpoint_every=1000 \
    --set sample.every=1000 2>&1 | tail -n 40 > "$out/train-tail.log"
run=$(ls -d runs/*cifar10* | sort | tail -n 1)
cp "$run/stats.jsonl" "$out/stats.jsonl"
python -m wdmctl sample --run "$run" --n 100 --class 0,1,2,3,4,5,6,7,8,9 --steps 50 --batch-size 100 \
    --out "$out/samples" --overwrite   # a 10x10 grid, one class per column, cfg 1.5 (the recipe's)
python -m wdmctl fid ref "$src" --resolution 32 --out refs/cifar10-train-32.npz $inception
python -m wdmctl fid --run "$run" --num "$num" --steps 20 --cfg 1.0 --batch-size 1000 --precision bf16 \
    --ref refs/cifar10-train-32.npz $inception --json > "$out/fid.json"
# the same without clipping the predicted x0 (what sampling did before it was the pixel-model default)
python -m wdmctl fid --run "$run" --num "$num" --steps 20 --cfg 1.0 --batch-size 1000 --precision bf16 --no-clip-x0 \
    --ref refs/cifar10-train-32.npz $inception --json --overwrite > "$out/fid-noclip.json"
python -m wdmctl bench inception --batch-size 200 --resolution 32 $inception --out "$out/inception.json" > /dev/null
