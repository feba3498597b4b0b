#!/usr/bin/env bash
# Issue 8's benchmarks in one run on one GPU (benchmarks/h100-issue8/ came from this on an H100):
# scan forward and forward+backward per backend; training-step throughput per scan backend with eager launches
# and with the whole step replayed as one CUDA graph, U-ViT beside; where a graphed WDM-B/2 step spends its GPU
# time; sampling throughput per scan backend, eager and replayed, U-ViT beside.
# Usage: scripts/gpu-issue8-bench.sh OUT_DIR   (needs a CUDA GPU, triton, and mamba-ssm for its columns)
set -euo pipefail
OUT=${1:?usage: scripts/gpu-issue8-bench.sh OUT_DIR}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
python -m wdmctl bench scan --out "$OUT/h100-scan.json" > /dev/null
python -m wdmctl bench train --presets WDM-B/2,WDM-XL/2 --backends mamba_ssm,triton --batch 32 \
  --cuda-graphs off,on --out "$OUT/h100-train.json" > /dev/null
python -m wdmctl bench train --presets WDM-B/2 --backends triton --batch 32 --cuda-graphs on --profile \
  --out "$OUT/h100-train-profile.json" > /dev/null
python -m wdmctl bench sample --presets WDM-B/2,WDM-XL/2 --backends mamba_ssm,triton --batch 16 --iters 2 \
  --cfgs 1.0,1.5 --precisions bf16 --cuda-graphs off,on --out "$OUT/h100-sample.json" > /dev/null
echo "wrote $OUT/h100-{scan,train,train-profile,sample}.json"
