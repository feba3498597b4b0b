#!/usr/bin/env bash
# Issue 16's kernel-level numbers still missing after the fourth H200 session (the limits below add up to
# 560 s), for the presets' default (no local conv):
#  - the triton backend's GPU tests (tests/test_triton_scan.py -m gpu: the token-major copies among them; the
#    segmented scan's 73 passed in that session, benchmarks/h200-issue16-gpu-tests-scan-partial.txt);
#  - the scan at the model's own shapes, WDM-B/2's d_inner 1536 at 256 / 1,024 / 4,096 tokens with the
#    scaling table's batches (64 / 32 / 8), triton and triton-segmented at several segment counts, model
#    layout: where segments pay (the issue's four shapes were timed in that session,
#    benchmarks/h200-issue16-scan-segmented-noconv.json). A segmented forward with the plain backward costs
#    the segmented row's forward_ms plus triton's (forward_backward_ms - forward_ms);
#  - where a graphed WDM-B/2 training step's GPU time goes at 4,096 tokens beside 256, U-ViT beside;
#  - WDM-B/2 training with triton-segmented beside triton at 4,096 tokens (graphed).
# Usage: scripts/gpu-issue16-kernels.sh OUT_DIR   (needs a CUDA GPU, triton, and mamba-ssm for its column)
set -uo pipefail
OUT=${1:?usage: scripts/gpu-issue16-kernels.sh OUT_DIR}
source "$(dirname "$0")/gpu-bench-lib.sh"
start_run
start=$SECONDS
timeout 180 python -m pytest -q -m gpu tests/test_triton_scan.py -x > "$OUT/gpu-tests-triton-scan.txt" 2>&1
echo "gpu-tests-triton-scan: exit $? after $((SECONDS - start)) s: $(tail -n 1 "$OUT/gpu-tests-triton-scan.txt")"
timed scan-model-shapes 140 bench scan --shapes 64x1536x258,32x1536x1026,8x1536x4098 --layouts model \
  --backends mamba_ssm,triton,triton-segmented --segments default,2,4,8,16 --no-convs
timed train-profile 110 bench train --presets WDM-B/2 --backends triton --sizes 32:64,128:8 --cuda-graphs on \
  --profile --iters 5
timed train-segmented 130 bench train --presets WDM-B/2 --backends triton,triton-segmented --sizes 128:8 \
  --cuda-graphs on --iters 5
