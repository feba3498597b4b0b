#!/usr/bin/env bash
# Issue 15's skip-init ablation at the quickstart's size, on a CPU: recipes/quickstart.toml (0.53M parameters,
# 1+1+1 blocks per U, so 2 long-skip fusions; 2,000 steps on the bundled digits) with its fusions started as
# U-ViT's xavier (the recipe pins it) or as the mean of stream and skip (the WDM-* presets' default), seeds 0
# and 1, one run at a time. Each run gets the recipe's grid (100 samples, a class per column) and FID-300.
# Usage: scripts/cpu-quickstart-skipinit.sh WORK   (WORK holds the cache, the runs, the samples and the FID JSON)
set -euo pipefail
work=${1:?usage: scripts/cpu-quickstart-skipinit.sh WORK}
mkdir -p "$work"
[ -f "$work/cache/manifest.json" ] || wdmctl cache digits --out "$work/cache" --resolution 8 --vae none > "$work/cache.log" 2>&1
for seed in 0 1; do
  for init in xavier average; do
    arm=$init-seed$seed start=$SECONDS
    wdmctl train recipes/quickstart.toml --runs-dir "$work/runs/$arm" --set data.cache="\"$work/cache\"" \
        --set model.skip_init="\"$init\"" --set train.seed=$seed --set log.tensorboard=false > "$work/train-$arm.log" 2>&1
    run=$(ls -d "$work/runs/$arm"/*/ | sort | tail -n 1)
    wdmctl sample --run "$run" --n 100 --class 0,1,2,3,4,5,6,7,8,9 --out "$work/samples/$arm" --overwrite > /dev/null
    wdmctl fid --run "$run" --json --overwrite > "$work/fid-$arm.json"
    echo "$arm: $((SECONDS - start)) s, FID-300 $(python -c "import json, sys; print(round(json.load(open(sys.argv[1]))['fid'], 2))" "$work/fid-$arm.json")"
  done
done
