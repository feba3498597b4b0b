#!/usr/bin/env bash
# Issue 16's kernel-level numbers in one run on one GPU (about 8.5 minutes on an H200, 9.5 at most with the
# segmented scan's 60 s; the limits below add up to 590 s): the fused 2-D conv's GPU
# parity tests; the selective scan forward+backward at the issue's four shapes, triton in the model's and in the
# contiguous (batch, d, L) layout beside mamba_ssm in both, with the conv1d and the 2-D conv (fused vs PyTorch)
# beside; where a graphed training step's GPU time goes at 4,096 tokens beside 256 (WDM-B/2 and UViT-B/2); and
# torch.compile of everything but the Triton kernels beside eager and CUDA graphs (256 tokens, batch 64); the
# segmented scan forward beside the plain one (scan-segmented.json, `segmented_vs_triton`).
# Usage: scripts/gpu-issue16-kernels.sh OUT_DIR   (needs a CUDA GPU, triton, and mamba-ssm for its columns)
set -uo pipefail
OUT=${1:?usage: scripts/gpu-issue16-kernels.sh OUT_DIR}
source "$(dirname "$0")/issue16-lib.sh"
start_run
start=$SECONDS
timeout 90 python -m pytest -q -m gpu tests/test_grid_conv.py > "$OUT/gpu-tests-grid-conv.txt" 2>&1
echo "gpu-tests-grid-conv: exit $? after $((SECONDS - start)) s: $(tail -n 1 "$OUT/gpu-tests-grid-conv.txt")"
timed scan 140 bench scan --shapes 64x1024x258,64x3072x258,16x3072x1026,16x1024x1026 --backends mamba_ssm,triton
timed train-profile 110 bench train --presets WDM-B/2 --backends triton --sizes 32:64,128:8 --cuda-graphs on \
  --profile --iters 5
timed train-compile-wdm 130 bench train --presets WDM-B/2 --no-uvit --backends triton --batch 64 \
  --compile off,on --cuda-graphs on,off --iters 5
timed train-compile-uvit 60 bench train --presets UViT-B/2 --batch 64 --compile off,on --cuda-graphs on,off --iters 5
# the segmented forward (backend triton-segmented, never run on a GPU before this) beside triton at L = 258, batch 8
# and 64: S = its default and 2, 4, 8; the model's layout only, no conv tables, so that it fits in 60 s
timed scan-segmented 60 bench scan --shapes 8x1536x258,64x1536x258 --backends triton,triton-segmented \
  --segments default,2,4,8 --layouts model --no-convs --no-profile --iters 5
