#!/usr/bin/env bash
# Issue 16's rule-edge numbers (the limits below add up to 280 s; last run on an H200 on 2026-12-03,
# benchmarks/h200-issue16-rule/scan-rule-edges.json and train-rule-4096.json, which set segmented.SEGMENT_TIERS):
#  - the scan between the first measured win (2.30x at 8 x 1536 x 4098) and the measured losses (49K-98K
#    channels): 16 x 1536 x 4098 (24K channels), 8 x 2304 x 4098 (WDM-XL/2's 18K), 16 x 1024 x 4098 (16K),
#    8 x 1536 x 2050 (12K at 2,048 tokens), 8 x 1536 x 1026, plain against segmented (default S), model layout;
#  - graphed WDM-B/2 training at 4,096 tokens with `triton` (the rule) beside `triton-plain` (never segments).
# Usage: scripts/gpu-issue16-kernels.sh OUT_DIR   (needs a CUDA GPU and triton)
set -uo pipefail
OUT=${1:?usage: scripts/gpu-issue16-kernels.sh OUT_DIR}
source "$(dirname "$0")/gpu-bench-lib.sh"
start_run
timed scan-rule-edges 150 bench scan --shapes 16x1536x4098,8x2304x4098,16x1024x4098,8x1536x2050,8x1536x1026 \
  --layouts model --backends triton-plain,triton-segmented --segments default --no-convs
timed train-rule-4096 130 bench train --presets WDM-B/2 --backends triton-plain,triton --sizes 128:8 \
  --cuda-graphs on --iters 5
