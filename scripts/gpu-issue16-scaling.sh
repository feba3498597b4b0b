#!/usr/bin/env bash
# Issue 16's scaling table in one run on one GPU (about 8 minutes on an H200): WDM-B/2 as the presets define it
# (scan "cycle", the triton scan, no local conv since issue 15's stripe ablation) against UViT-B/2 (PyTorch SDPA) at
# 256, 1,024 and 4,096 tokens (latent sides 32, 64 and 128 at patch 2): training images/s and peak memory at
# batches 64 / 32 / 8, and 50-step DPM-Solver++ sampling at batch 64, each replayed as CUDA graphs and eager;
# every JSON holds each WD-Mamba / U-ViT ratio ("versus_uvit") and the length where WD-Mamba overtakes
# ("crossover"). Graphed rows first: where a time limit stops a command, the rows that matter most are in.
# Usage: scripts/gpu-issue16-scaling.sh OUT_DIR   (needs a CUDA GPU and triton)
set -uo pipefail
OUT=${1:?usage: scripts/gpu-issue16-scaling.sh OUT_DIR}
source "$(dirname "$0")/gpu-bench-lib.sh"
start_run
timed train-scaling 300 bench train --presets WDM-B/2 --backends triton --sizes 32:64,64:32,128:8 \
  --cuda-graphs on,off
timed sample-scaling 210 bench sample --presets WDM-B/2 --backends triton --sizes 32,64,128 --batch 64 \
  --steps 50 --cfgs 1.0 --precisions bf16 --iters 1 --cuda-graphs on,off
