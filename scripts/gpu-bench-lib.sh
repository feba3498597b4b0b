# Sourced by scripts/gpu-issue16-*.sh and gpu-issue17-sizes.sh. `timed NAME SECONDS ARGS...` runs `python -m wdmctl
# ARGS --out $OUT/NAME.json` under a time limit, its stderr in $OUT/NAME.log, and says how long it took. A failure
# or a timeout is reported, not fatal: the bench commands save their rows (bench denoiser: its model/batch
# entries) as they come, so a stopped one leaves what it measured.
timed() {
  local name=$1 limit=$2 start=$SECONDS rc=0
  shift 2
  timeout "$limit" python -m wdmctl "$@" --out "$OUT/$name.json" > /dev/null 2> "$OUT/$name.log" || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "$name: $((SECONDS - start)) s"
  else
    echo "$name: exit $rc after $((SECONDS - start)) s (124: its ${limit} s were up); the end of $OUT/$name.log:"
    tail -n 5 "$OUT/$name.log"
  fi
}

start_run() {
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
}
