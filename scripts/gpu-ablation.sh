#!/usr/bin/env bash
# Issue 15's architecture ablation on CIFAR-10 pixels: every arm is recipes/cifar10.toml with one model key
# changed (the controls change something else: lr2e-4 an optimiser key, fp32 the training precision, unfused
# the environment, arm_env), the same short-run recipe (that of scripts/gpu-cifar10.sh: lr 4e-4, 200
# warm-up steps, EMA 0.999 with warm-up, CUDA-graphed steps), the same steps, batch and seed. Arms train side by side on one GPU, each in its
# own process (under CUDA MPS when the machine has it, so the small models' kernels overlap), then each gets a
# 10x10 grid (50 steps, one class per column, cfg 1.5) and an FID against CIFAR-10 train statistics (20
# DPM-Solver++ steps, cfg 1, bf16) and a stripe score (scripts/periodic-texture.py).
#
#   scripts/gpu-ablation.sh train WORK DATA STEPS SEED ARM...   # start the arms in the background (setsid)
#       EXTRA_SETS="key=value ..." adds recipe keys to every arm (e.g. FID during training for Table 1)
#   scripts/gpu-ablation.sh status WORK                         # last log line of each arm
#   scripts/gpu-ablation.sh preset ARM...                       # the model preset each arm trains, a line each
#   scripts/gpu-ablation.sh steps BUDGET SOLO_JSON ARM...       # each arm's steps: BUDGET steps, or Nmin GPU-minutes
#   scripts/gpu-ablation.sh score WORK DATA INCEPTION NUM ARM...  # grids + FID-NUM of finished arms
#       FID_STEPS=50 samples the FID with 50 steps instead of 20; GRIDS_ONLY=1 draws the grids only
#
# WORK holds the cache, the runs (WORK/runs/ARM) and the scores; DATA is the CIFAR-10 train folder or archive.
set -euo pipefail

arm_overrides() {  # the recipe keys of each arm: one change from WDM-S/2 as the presets define it when the arm
                   # runs (the first ablation's default had Mamba's conv1d, the stripe ablation's the 2-D conv;
                   # since then it has no local conv, so `noconv` is the same model as `cycle`, and since the
                   # skip-init ablation its fusions start as the mean, so `skipavg` is too)
  case $1 in
    cycle)          echo "" ;;
    bidirectional)  echo 'model.scan="bidirectional"' ;;
    zigzag)         echo 'model.token_order="zigzag"' ;;
    pads)           echo 'model.pad_tokens=3' ;;
    conv2d)         echo 'model.mixer_conv="2d"' ;;
    zeroinit)       echo 'model.zero_init=true' ;;
    sincos)         echo 'model.position_embedding="sincos"' ;;
    smoother)       echo 'model.smoother=true' ;;
    offset2)        echo 'model.cycle_offset=2' ;;
    conv1d)         echo 'model.mixer_conv="causal1d"' ;;      # Mamba's conv: the default before issue 15
    noconv)         echo 'model.mixer_conv="none"' ;;          # no local conv (the default since the stripe ablation)
    lr2e-4)         echo 'optim.lr=2e-4' ;;                    # half the step size (not a model key)
    mamba_ssm)      echo 'model.scan_backend="mamba_ssm"' ;;   # the reference CUDA scan instead of our triton one
    fp32)           echo 'train.precision="fp32"' ;;           # no bf16 autocast in training
    unfused)        echo "" ;;                                 # WDMCTL_FUSED_KERNELS=0 (arm_env): PyTorch norm/conv
    uvit)           echo 'model.preset="UViT-S/2"' ;;
    umamba)         echo 'model.preset="UMamba-S/2"' ;;        # Table 1: one U
    dim)            echo 'model.preset="DiM-S/2"' ;;           # Table 1: DiM-style plain stack
    depth26)        echo 'model.depth=26' ;;                   # with dim (dim+depth26): WDM-S/2's 26 Mamba blocks
    skipavg)        echo 'model.skip_init="average"' ;;        # long-skip fusions start as (stream + skip) / 2: WDM's
                                                               # default since the skip-init ablation (umamba+skipavg)
    skipxavier)     echo 'model.skip_init="xavier"' ;;         # U-ViT's random fusions: WDM's default before it
    *+*)            local a; for a in ${1//+/ }; do arm_overrides "$a"; done ;;   # a combination: cycle's keys for each part
    *) echo "unknown arm: $1" >&2; exit 2 ;;
  esac
}

arm_env() {  # environment of an arm's processes (training and scoring): only `unfused` sets any
  case $1 in
    unfused|*+unfused|unfused+*|*+unfused+*) echo "WDMCTL_FUSED_KERNELS=0" ;;
    *) echo "" ;;
  esac
}

start_mps() {  # the arms are small: under MPS their kernels run concurrently instead of time-sliced
  command -v nvidia-cuda-mps-control >/dev/null || { echo "no MPS on this machine: arms are time-sliced"; return; }
  pgrep -x nvidia-cuda-mps >/dev/null && { echo "MPS already running"; return; }
  nvidia-cuda-mps-control -d || { echo "MPS did not start"; return; }
  if timeout 60 python -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
    echo "MPS running"
  else
    echo quit | nvidia-cuda-mps-control || true; echo "MPS did not work: stopped, arms are time-sliced"
  fi
}

arm_recipes() {  # ARM...: "ARM PRESET BATCH" a line each, as each arm's recipe resolves them
  local groups=() arm keys
  for arm in "$@"; do
    keys=$(arm_overrides "$arm")   # a plain assignment, so an unknown arm stops the script (set -e)
    # shellcheck disable=SC2206  # the keys split into words
    groups+=("$arm" $keys ";")
  done
  # one interpreter for all arms (importing wdmctl costs seconds): each arm's name and keys, ended by ";"
  python -c 'import sys; from wdmctl import config
for group in " ".join(sys.argv[1:]).split(";")[:-1]:
    arm, *keys = group.split()
    recipe = config.load_recipe("recipes/cifar10.toml", keys)
    print(arm, recipe.model.preset, recipe.train.batch_size)' "${groups[@]}"
}

cmd=$1; shift
case $cmd in
  train)
    work=$1 data=$2 steps=$3 seed=$4; shift 4
    mkdir -p "$work/logs"
    [ -f "$work/cache/manifest.json" ] || python -m wdmctl cache "$data" --out "$work/cache" --resolution 32 --vae none --device cuda
    start_mps
    for arm in "$@"; do
      sets=()
      for kv in $(arm_overrides "$arm") ${EXTRA_SETS:-}; do sets+=(--set "$kv"); done
      setsid nohup env $(arm_env "$arm") python -m wdmctl train recipes/cifar10.toml --runs-dir "$work/runs/$arm" --max-steps "$steps" \
        --set data.cache="\"$work/cache\"" --set data.num_workers=2 --set train.seed="$seed" \
        --set optim.warmup_steps=200 --set optim.lr=4e-4 --set ema.decay=0.999 --set ema.warmup=true \
        --set train.cuda_graph=true --set train.checkpoint_every="$steps" --set sample.every=0 \
        --set log.tensorboard=false "${sets[@]}" > "$work/logs/$arm.log" 2>&1 < /dev/null &
      echo "started $arm: ${sets[*]:-(default)}"
    done
    ;;
  preset)   # as the arm's recipe resolves it, so gpu-table1.sh times the models its arms train
    arm_recipes "$@" | cut -d' ' -f2
    ;;
  steps)    # BUDGET SOLO_JSON ARM...: "ARM STEPS" a line each. BUDGET is steps (every arm the same) or Nmin: N
            # GPU-minutes at the arm's solo speed in SOLO_JSON (a bench train JSON), N x 60 x images/s / batch
    budget=$1 solo=$2; shift 2
    arm_recipes "$@" | python -c 'import os, sys
from wdmctl.apps.report import solo_speeds
from wdmctl.errors import WdmError
budget, solo = sys.argv[1:]
arms = [line.split() for line in sys.stdin if line.strip()]   # read all first: an early exit breaks no pipe
if not (budget.isdigit() or budget.endswith("min")):
    sys.exit(f"budget must be steps or Nmin (GPU-minutes at solo speed), not {budget!r}")
if budget.endswith("min") and not os.path.exists(solo):
    sys.exit(f"{budget} needs the solo speeds, and {solo} does not exist")
try:  # read as wdmctl report --solo-speed reads it: the fastest row of each preset
    speeds = solo_speeds([solo]) if budget.endswith("min") else {}
except WdmError as error:
    sys.exit(str(error))
for arm, preset, batch in arms:
    if budget.isdigit():
        print(arm, budget)
    elif preset not in speeds:
        sys.exit(f"{solo} has no solo speed for {preset} (arm {arm})")
    else:
        print(arm, round(float(budget[:-3]) * 60 * speeds[preset] / int(batch)))' "$budget" "$solo"
    ;;
  status)
    work=$1
    for log in "$work"/logs/*.log; do echo "$(basename "$log" .log): $(tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -n 1)"; done
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader || true
    ;;
  score)
    work=$1 data=$2 inception=$3 num=$4; shift 4
    mkdir -p "$work/scores"
    ref=$work/ref-cifar10-train-32.npz
    [ -f "$ref" ] || python -m wdmctl fid ref "$data" --resolution 32 --out "$ref" --inception "$inception" --batch-size 500
    score_arm() {
      local arm=$1 run; run=$(ls -d "$work/runs/$arm"/*/ | sort | tail -n 1)
      env $(arm_env "$arm") python -m wdmctl sample --run "$run" --n 100 --class 0,1,2,3,4,5,6,7,8,9 --steps 50 --batch-size 100 \
        --out "$work/scores/$arm-samples" --overwrite > /dev/null
      cp "$run/stats.jsonl" "$work/scores/$arm-stats.jsonl"
      python scripts/periodic-texture.py --patch 2 --json "$work/scores/$arm-samples" > "$work/scores/$arm-stripes.json"
      [ -n "${GRIDS_ONLY:-}" ] && return 0
      env $(arm_env "$arm") python -m wdmctl fid --run "$run" --num "$num" --steps "${FID_STEPS:-20}" --cfg 1.0 --batch-size 1000 \
        --precision bf16 --ref "$ref" --inception "$inception" --json --overwrite > "$work/scores/$arm-fid$num.json"
    }
    for arm in "$@"; do score_arm "$arm" > "$work/logs/score-$arm.log" 2>&1 & done   # side by side, as in training
    wait
    [ -n "${GRIDS_ONLY:-}" ] && exit 0
    for arm in "$@"; do
      echo "$arm: $(python -c "import json,sys; print(round(json.load(open(sys.argv[1]))['fid'], 2))" "$work/scores/$arm-fid$num.json" 2>/dev/null || tail -n 2 "$work/logs/score-$arm.log")"
    done
    ;;
  *) echo "usage: $0 train|status|preset|score ..." >&2; exit 2 ;;
esac
