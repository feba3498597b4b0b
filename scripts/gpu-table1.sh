#!/usr/bin/env bash
# Issue 15's Table 1 on one GPU: WD-Mamba (WDM-S/2, the preset default), U-Mamba (UMamba-S/2, one U), a DiM-style
# plain stack (DiM-S/2) and U-ViT (UViT-S/2), all ~30M parameters, on CIFAR-10 pixels with the recipe of
# scripts/gpu-ablation.sh, side by side under CUDA MPS. Seed 0 of every arm measures FID-10K of its EMA weights
# (20 DPM-Solver++ steps, cfg 1) halfway and at the end of its run; WD-Mamba and U-ViT train a second seed too,
# measured at the end, so the head-to-head claim rests on two seeds. Before the arms start, each preset's
# training speed is timed alone on the idle GPU (bench train, CUDA graphs, batch 128), which converts images
# seen into GPU-minutes (the arms share the GPU, so their wall time is not theirs alone).
#
#   scripts/gpu-table1.sh start WORK DATA INCEPTION BUDGET       # ref stats, solo speeds, arms in the background
#       BUDGET: steps (equal steps for every arm) or Nmin (equal GPU time: each arm trains N GPU-minutes at its own
#       solo speed, timed first; WORK/seedK/steps.txt says how many steps that was)
#   scripts/gpu-table1.sh status WORK
#   scripts/gpu-table1.sh final WORK DATA INCEPTION NUM ARM...   # 10x10 grids of every arm, FID-NUM at 50 steps
#                                                                # of the seed-0 ARMs listed (none: grids only)
# WORK/seed0 and WORK/seed1 are scripts/gpu-ablation.sh work folders (WORK/seed1/cache links to seed 0's).
# SEED0_ARMS (default "cycle umamba dim uvit") picks the seed-0 arms, e.g. SEED0_ARMS="cycle uvit" for the
# head-to-head alone when the four arms' 4,000 steps do not fit in one session's device time; the solo speeds
# are timed for the presets of the arms it trains. SEED1_ARMS (default "cycle uvit") picks the second seed's arms; empty
# ("") trains no second seed, e.g. SEED0_ARMS="umamba dim" SEED1_ARMS="" to add the other two layouts later.
set -euo pipefail
here=$(dirname "$0")
seed0_arms=${SEED0_ARMS:-cycle umamba dim uvit}
seed1_arms=${SEED1_ARMS-cycle uvit}   # set but empty: no second seed
cmd=$1; shift
case $cmd in
  start)
    work=$1 data=$2 inception=$3 steps=$4
    mkdir -p "$work/seed0" "$work/seed1"
    ref=$work/seed0/ref-cifar10-train-32.npz   # the name gpu-ablation.sh score looks for
    [ -f "$ref" ] || python -m wdmctl fid ref "$data" --resolution 32 --out "$ref" --inception "$inception" \
      --batch-size 500
    cp "$ref" "$work/seed1/"
    # shellcheck disable=SC2086  # the arm lists split into words
    presets=$(bash "$here/gpu-ablation.sh" preset $seed0_arms $seed1_arms | sort -u | paste -sd,)
    [ -f "$work/solo-speed.json" ] || timeout 240 python -m wdmctl bench train --presets "$presets" \
      --no-uvit --backends triton --batch 128 --resolution 32 --cuda-graphs on --iters 10 \
      --out "$work/solo-speed.json" || echo "solo speed bench failed: GPU-minutes will be missing"
    fid="fid.every_num=10000 fid.every_batch_size=1000 fid.steps=20 fid.cfg=1.0 fid.ref=\"$ref\" fid.inception=\"$inception\""
    train_arms() {  # SEED FID_POINTS ARM...: each arm for its own steps (gpu-ablation.sh steps), FID at
                    # FID_POINTS evenly spaced points of its run (the last at its end)
      local seed=$1 points=$2 plan arm arm_steps; shift 2
      plan=$(bash "$here/gpu-ablation.sh" steps "$steps" "$work/solo-speed.json" "$@")
      : > "$work/seed$seed/steps.txt"
      while read -r arm arm_steps; do
        arm_steps=$((arm_steps / points * points))   # so that the last FID falls on the run's last step
        echo "$arm $arm_steps" >> "$work/seed$seed/steps.txt"
        EXTRA_SETS="fid.every=$((arm_steps / points)) $fid" bash "$here/gpu-ablation.sh" train "$work/seed$seed" \
          "$data" "$arm_steps" "$seed" "$arm"
      done <<< "$plan"
    }
    # shellcheck disable=SC2086  # the arm list splits into words
    train_arms 0 2 $seed0_arms
    if [ -n "$seed1_arms" ]; then
      ln -sfn "$work/seed0/cache" "$work/seed1/cache"
      # shellcheck disable=SC2086  # the arm list splits into words
      train_arms 1 1 $seed1_arms
    fi
    ;;
  status)
    work=$1
    for seed in seed0 seed1; do [ -d "$work/$seed/logs" ] || continue; echo "[$seed]"; bash "$here/gpu-ablation.sh" status "$work/$seed" | grep -v MiB || true; done
    grep -h '"fid"' "$work"/seed*/runs/*/*/stats.jsonl 2>/dev/null | cut -c1-160 || true
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader || true
    ;;
  final)
    work=$1 data=$2 inception=$3 num=$4; shift 4
    FID_STEPS=50 bash "$here/gpu-ablation.sh" score "$work/seed0" "$data" "$inception" "$num" "$@" &
    GRIDS_ONLY=1 bash "$here/gpu-ablation.sh" score "$work/seed0" "$data" "$inception" 0 \
      $(for a in $seed0_arms; do [[ " $* " == *" $a "* ]] || echo "$a"; done) &
    # shellcheck disable=SC2086  # the arm list splits into words
    [ -z "$seed1_arms" ] || GRIDS_ONLY=1 bash "$here/gpu-ablation.sh" score "$work/seed1" "$data" "$inception" 0 $seed1_arms &
    wait
    ;;
  *) echo "usage: $0 start|status|final ..." >&2; exit 2 ;;
esac
