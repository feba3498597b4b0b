#!/usr/bin/env bash
# What the 2-D mixer conv (issue 15's new default) costs in training speed: one graphed training step of
# WDM-B/2 with mixer_conv "2d" and "causal1d", and UViT-B/2, in one run on one GPU (batch 64, 256 px latents =
# 256 patch tokens, bf16, the triton scan). The 2-D conv runs as PyTorch's depthwise Conv2d between two permutes.
# Usage: scripts/gpu-mixer-conv-speed.sh OUT.json
set -euo pipefail
python - "$1" <<'PY'
import sys
from wdmctl.bench.train import benchmark_train_step
from wdmctl.core.device import write_json

rows = [benchmark_train_step("WDM-B/2", "triton", 64, cuda_graph=True, mixer_conv=conv) for conv in ("2d", "causal1d")]
for row, conv in zip(rows, ("2d", "causal1d")):
    row["mixer_conv"] = conv
rows.append(benchmark_train_step("UViT-B/2", "auto", 64, cuda_graph=True))
print(write_json(sys.argv[1], {"benchmark": "train", "results": rows}))
PY
