#!/usr/bin/env bash
# Issue 17's image parity on a GPU: a small WD-Mamba (the quickstart recipe with the presets' mixer, no local
# conv, and the GPU's scan backend) trained briefly on scikit-learn's digits, exported in the linear-attention
# form at fp32 and fp16, then 64 images sampled with the same seeds and classes through `--backend torch` and
# `--backend onnx` (ONNX Runtime's CUDA EP). OUT/images-DTYPE.json: PSNR, the largest difference in uint8
# levels, the share of values more than one level apart (scripts/compare-samples.py).
# Usage: scripts/gpu-issue17-images.sh WORK OUT [STEPS]      (about 2-3 minutes on an H200 at 1,000 steps)
set -euo pipefail
work=$1 out=$2 steps=${3:-1000}
here=$(dirname "$0")
mkdir -p "$work" "$out"
[ -f "$work/cache/manifest.json" ] || python -m wdmctl cache digits --out "$work/cache" --resolution 8 --vae none
python -m wdmctl train recipes/quickstart.toml --runs-dir "$work/runs" --max-steps "$steps" \
  --set data.cache="\"$work/cache\"" --set model.mixer_conv='"none"' --set model.scan_backend='"auto"' \
  --set sample.every=0 --set train.checkpoint_every="$steps" > "$work/train.log" 2>&1
run=$(ls -d "$work"/runs/*/ | sort | tail -n 1)
for dtype in fp32 fp16; do
  python -m wdmctl export --run "$run" --out "$work/export-$dtype" --dtype "$dtype" --batch-size 16 --overwrite
  for backend in torch onnx; do
    python -m wdmctl sample --run "$run" --n 64 --class random --seed 0 --batch-size 16 --steps 25 \
      --precision "$dtype" --backend "$backend" --export-dir "$work/export-$dtype" --no-grid \
      --out "$work/$backend-$dtype" --overwrite > /dev/null
  done
  python "$here/compare-samples.py" "$work/torch-$dtype" "$work/onnx-$dtype" | tee "$out/images-$dtype.json"
done
