#!/usr/bin/env bash
# The last round of the quickstart recipe sweep (docs/train.md, docs/images/quickstart-sweep.png): ten variants
# of recipes/quickstart.toml trained side by side on one GPU (fp32, same data, seeds and sampler), then one
# montage of their EMA grids at steps 1000, 1500 and 2000.
# Usage: scripts/quickstart-sweep.sh OUT_DIR   (run from the repo root; needs caches/digits8 and a CUDA GPU)
set -euo pipefail
OUT=${1:?usage: scripts/quickstart-sweep.sh OUT_DIR}
mkdir -p "$OUT"
run() {  # name, then --set overrides
  local name=$1; shift
  local args=(); for kv in "$@"; do args+=(--set "$kv"); done
  python -m wdmctl train recipes/quickstart.toml --runs-dir "$OUT/$name" --set model.scan_backend='"auto"' \
    --set sample.every=500 --set log.tensorboard=false "${args[@]}" > "$OUT/$name.log" 2>&1
}
B=train.batch_size=32; G=sample.cfg=3.0; E=model.expand=1; D=model.depth=1; S=train.max_steps
run a_e1d1 "$B" "$G" "$E" "$D" $S=2000 &
run b_e1d1_2500 "$B" "$G" "$E" "$D" $S=2500 &
run c_e1 "$B" "$G" "$E" model.depth=2 $S=2000 &
run d_e1d1lr3 "$B" "$G" "$E" "$D" optim.lr=3e-3 $S=2000 &
run e_e1d1w160 "$B" "$G" "$E" "$D" model.width=160 $S=2000 &
run f_d1 "$B" "$G" model.expand=2 "$D" $S=2000 &
run g_e1d1ds8 "$B" "$G" "$E" "$D" model.d_state=8 $S=2000 &
run h_e1d1_1600 "$B" "$G" "$E" "$D" $S=1600 &
run i_e1_1600 "$B" "$G" "$E" model.depth=2 $S=1600 &
run j_e1d1_bs48 train.batch_size=48 "$G" "$E" "$D" $S=2000 &
wait
python - "$OUT" <<'PY'
import glob, os, sys
from PIL import Image, ImageDraw
root = sys.argv[1]
names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
steps = (1000, 1500, 2000)
grids = {(n, s): glob.glob(f"{root}/{n}/*/samples/grid-{s:07d}.png") for n in names for s in steps}
w, h = Image.open(next(v[0] for v in grids.values() if v)).size
scale = 2
M = Image.new("L", (200 + 3 * (w * scale + 10), 30 + len(names) * (h * scale + 10)), 255)
d = ImageDraw.Draw(M)
for j, s in enumerate(steps):
    d.text((200 + j * (w * scale + 10) + w // 2, 10), f"step {s}", fill=0)
for i, n in enumerate(names):
    d.text((5, 30 + i * (h * scale + 10) + h), n, fill=0)
    for j, s in enumerate(steps):
        if grids[(n, s)]:
            im = Image.open(grids[(n, s)][0]).convert("L").resize((w * scale, h * scale), Image.NEAREST)
            M.paste(im, (200 + j * (w * scale + 10), 30 + i * (h * scale + 10)))
M.save(f"{root}/quickstart-sweep.png", optimize=True)
print(f"wrote {root}/quickstart-sweep.png")
PY
