#!/usr/bin/env bash
# Issue 8's benchmarks in one run on one GPU (benchmarks/h100-issue8/ came from this on an H100):
# the CUDA-graph sampling test, then scan, training-step and sampling throughput per scan backend, U-ViT beside.
# Usage: scripts/gpu-issue8-bench.sh OUT_DIR   (needs a CUDA GPU, triton, and mamba-ssm for its columns)
set -euo pipefail
OUT=${1:?usage: scripts/gpu-issue8-bench.sh OUT_DIR}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
python -m pytest -q -m gpu tests/test_cuda_graph.py -p no:cacheprovider
python -m wdmctl bench scan --out "$OUT/h100-scan.json" > /dev/null
python -m wdmctl bench train --presets WDM-B/2,WDM-XL/2 --batch 32 --out "$OUT/h100-train.json" > /dev/null
python -m wdmctl bench sample --presets WDM-B/2,WDM-XL/2 --batch 16 --iters 2 --cfgs 1.0,1.5 --precisions bf16 \
  --cuda-graphs off,on --out "$OUT/h100-sample.json" > /dev/null
echo "wrote $OUT/h100-{scan,train,sample}.json"
