#!/usr/bin/env bash
# Issue 16's kernel-level numbers in one run on one GPU (the limits below add up to 560 s), for the presets'
# default (no local conv) and the scan paths that have not run on a GPU yet:
#  - the segmented scan's GPU parity tests, forward and backward (tests/test_triton_segmented.py -m gpu) and
#    the triton backend's (tests/test_triton_scan.py -m gpu, the token-major copies included);
#  - the scan forward+backward at the issue's four shapes: mamba_ssm, triton and triton-segmented (its default
#    S) in the model's layout and the contiguous (batch, d, L) one, triton also with token-major copies of
#    contiguous inputs (`contiguous-token-major`); `speedup_vs_mamba_ssm` and `segmented_vs_triton`;
#  - where a graphed WDM-B/2 training step's GPU time goes at 4,096 tokens beside 256, U-ViT beside;
#  - WDM-B/2 training with triton-segmented beside triton at 1,024 and 4,096 tokens (graphed).
# (The 2-D conv's GPU tests and torch.compile, measured in an earlier run: benchmarks/h200-issue16-*.json.)
# Usage: scripts/gpu-issue16-kernels.sh OUT_DIR   (needs a CUDA GPU, triton, and mamba-ssm for its columns)
set -uo pipefail
OUT=${1:?usage: scripts/gpu-issue16-kernels.sh OUT_DIR}
source "$(dirname "$0")/issue16-lib.sh"
start_run
start=$SECONDS
timeout 150 python -m pytest -q -m gpu tests/test_triton_segmented.py tests/test_triton_scan.py -x \
  > "$OUT/gpu-tests-scan.txt" 2>&1
echo "gpu-tests-scan: exit $? after $((SECONDS - start)) s: $(tail -n 1 "$OUT/gpu-tests-scan.txt")"
timed scan 170 bench scan --shapes 64x1024x258,64x3072x258,16x3072x1026,16x1024x1026 \
  --backends mamba_ssm,triton,triton-segmented --no-convs
timed train-profile 110 bench train --presets WDM-B/2 --backends triton --sizes 32:64,128:8 --cuda-graphs on \
  --profile --iters 5
timed train-segmented 130 bench train --presets WDM-B/2 --backends triton,triton-segmented --sizes 64:32,128:8 \
  --cuda-graphs on --iters 5
