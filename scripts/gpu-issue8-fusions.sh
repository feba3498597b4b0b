#!/usr/bin/env bash
# What issue 8's two token-order fusions win, in one run on one GPU (benchmarks/h100-issue8/h100-fusions-*.json
# came from this on an H100): `triton` (column-major order read in place, both directions of a bidirectional
# block in one launch) against `triton-unfused` (the same kernels behind transposed copies, one call per
# direction), training and sampling, the presets' own scan (cycle) and --scan bidirectional, U-ViT beside.
# Usage: scripts/gpu-issue8-fusions.sh OUT_DIR   (needs a CUDA GPU and triton)
set -euo pipefail
OUT=${1:?usage: scripts/gpu-issue8-fusions.sh OUT_DIR}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
for scan in cycle bidirectional; do
  python -m wdmctl bench train --presets WDM-B/2 --backends triton,triton-unfused --scan "$scan" --batch 32 \
    --cuda-graphs off,on --out "$OUT/h100-fusions-train-$scan.json" > /dev/null
  python -m wdmctl bench sample --presets WDM-B/2 --no-uvit --backends triton,triton-unfused --scan "$scan" \
    --batch 16 --cfgs 1.0 --precisions bf16 --cuda-graphs on --out "$OUT/h100-fusions-sample-$scan.json" > /dev/null
done
echo "wrote $OUT/h100-fusions-{train,sample}-{cycle,bidirectional}.json"
