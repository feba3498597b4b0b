#!/usr/bin/env bash
# Issue 15's latent-space run end to end on one GPU, on the path the celebahq and imagenet256 recipes take:
# CIFAR-10 at 128 px through TAEF2 -> cache -> train the default WDM-S/2 (recipes/cifar10-taef2.toml, shortened
# like scripts/gpu-cifar10.sh) -> a decoded 10x10 grid -> FID-NUM against CIFAR-10 train at 128 px.
# Usage: scripts/gpu-latent-cifar.sh CIFAR_TRAIN_DIR_OR_TAR TAEF2_DIR INCEPTION_PT WORK OUT [STEPS] [NUM]
set -euo pipefail
src=$1 taef2=$2 inception=$3 work=$4 out=$5 steps=${6:-4000} num=${7:-10000}
mkdir -p "$work" "$out"
python -m wdmctl cache "$src" --out "$work/cache" --resolution 128 --vae "taef2:$taef2" --device cuda --dtype bf16
python -m wdmctl train recipes/cifar10-taef2.toml --runs-dir "$work/runs" --max-steps "$steps" \
    --set data.cache="\"$work/cache\"" --set optim.warmup_steps=200 --set optim.lr=4e-4 --set ema.decay=0.999 \
    --set ema.warmup=true --set train.cuda_graph=true --set train.checkpoint_every="$steps" --set sample.every=0 \
    --set log.tensorboard=false 2>&1 | tail -n 30 > "$out/train-tail.log"
run=$(ls -d "$work/runs"/*/ | sort | tail -n 1)
cp "$run/stats.jsonl" "$out/stats.jsonl"
python -m wdmctl sample --run "$run" --n 100 --class 0,1,2,3,4,5,6,7,8,9 --steps 50 --batch-size 100 \
    --out "$out/samples" --overwrite > /dev/null
python -m wdmctl fid --run "$run" --num "$num" --steps 20 --cfg 1.0 --batch-size 500 --precision bf16 \
    --ref "$src" --inception "$inception" --json --overwrite > "$out/fid.json"
