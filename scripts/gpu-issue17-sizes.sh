#!/usr/bin/env bash
# Issue 17's speed table at the sizes not yet measured: WDM-B/2 at guidance batch 2 x 32, WDM-XL/2 at 2 x 8
# and 2 x 32, fp16, eager and eager + CUDA graphs beside the linear-attention export on ONNX Runtime's CUDA EP
# (shared C and B, the default; and the scan in fp16), one JSON and one time limit per size (they add up to
# 540 s). WDM-B/2 at 2 x 8 ran in the session before
# (benchmarks/h200-issue17-denoiser-b2-bs8-shared.json).
# Usage: scripts/gpu-issue17-sizes.sh OUT_DIR   (needs a CUDA GPU and onnxruntime-gpu; docs/export.md stages it)
set -uo pipefail
OUT=${1:?usage: scripts/gpu-issue17-sizes.sh OUT_DIR}
source "$(dirname "$0")/gpu-bench-lib.sh"
start_run
backends=eager,eager-cuda-graph,ort-linear-attention,ort-linear-attention-dtype-scan
timed denoiser-b2-bs32 150 bench denoiser --preset WDM-B/2 --batch-size 32 --dtype fp16 --backends "$backends" \
  --work-dir /tmp/bench
timed denoiser-xl2-bs8 190 bench denoiser --preset WDM-XL/2 --batch-size 8 --dtype fp16 --backends "$backends" \
  --work-dir /tmp/bench
timed denoiser-xl2-bs32 200 bench denoiser --preset WDM-XL/2 --batch-size 32 --dtype fp16 --backends "$backends" \
  --work-dir /tmp/bench
