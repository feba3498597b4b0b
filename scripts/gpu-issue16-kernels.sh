#!/usr/bin/env bash
# Issue 16's kernel-level numbers still missing (the limits below add up to 280 s). Measured so far, for the
# presets' default (no local conv): all 85 triton GPU tests and all 75 segmented-scan GPU tests pass on the
# H200 (the `triton` entry's segmenting rule included); the scan at WDM-B/2's own shapes
# (benchmarks/h200-issue16-scan-model-shapes.json: segments win 2.30x at 8 x 1536 x 4098 and lose at
# 64 x 1536 x 258 and 32 x 1536 x 1026); graphed WDM-B/2 training at 4,096 tokens, 48.5 img/s in segments
# against 27.3 without (h200-issue16-train-segmented-4096.json). Since then the `triton` backend segments by
# itself where that run measured a win (segmented.segments_pay); `triton-plain` never does. Left:
#  - the scan between the measured win and the measured losses, to place the rule's edges: 16 x 1536 x 4098
#    (24K channels), 8 x 2304 x 4098 (WDM-XL/2's 18K), 16 x 1024 x 4098 (16K), 8 x 1536 x 2050 (12K at 2,048
#    tokens), 8 x 1536 x 1026, plain against segmented (default S), model layout;
#  - graphed WDM-B/2 training at 4,096 tokens with `triton` (the rule) beside `triton-plain`.
# Usage: scripts/gpu-issue16-kernels.sh OUT_DIR   (needs a CUDA GPU and triton)
set -uo pipefail
OUT=${1:?usage: scripts/gpu-issue16-kernels.sh OUT_DIR}
source "$(dirname "$0")/gpu-bench-lib.sh"
start_run
timed scan-rule-edges 150 bench scan --shapes 16x1536x4098,8x2304x4098,16x1024x4098,8x1536x2050,8x1536x1026 \
  --layouts model --backends triton-plain,triton-segmented --segments default --no-convs
timed train-rule-4096 130 bench train --presets WDM-B/2 --backends triton-plain,triton --sizes 128:8 \
  --cuda-graphs on --iters 5
