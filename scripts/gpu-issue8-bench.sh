#!/usr/bin/env bash
# Issue 8's benchmarks in one run on one GPU (benchmarks/h100-issue8/ came from this on an H100):
# scan forward and forward+backward per backend; training-step throughput per scan backend with eager launches
# and with the whole step replayed as one CUDA graph, U-ViT beside; where a graphed WDM-B/2 step spends its GPU
# time. Usage: scripts/gpu-issue8-bench.sh OUT_DIR   (needs a CUDA GPU, triton, and mamba-ssm for its columns)
# Sampling (h100-sample.json) is `bench sample ... --cuda-graphs off,on`, see docs/triton-scan.md.
set -euo pipefail
OUT=${1:?usage: scripts/gpu-issue8-bench.sh OUT_DIR}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
python -m wdmctl bench scan --out "$OUT/h100-scan.json" > /dev/null
python -m wdmctl bench train --presets WDM-B/2,WDM-XL/2 --backends mamba_ssm,triton --batch 32 \
  --cuda-graphs off,on --out "$OUT/h100-train.json" > /dev/null
python -m wdmctl bench train --presets WDM-B/2 --backends triton --batch 32 --cuda-graphs on --profile \
  --out "$OUT/h100-train-profile.json" > /dev/null
echo "wrote $OUT/h100-{scan,train,train-profile}.json"
