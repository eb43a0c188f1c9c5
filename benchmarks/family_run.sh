#!/usr/bin/env bash
# A real gpt2-preset family on one GPU machine, on the machine's installed Python sources, with
# core-lite CORE on every final checkpoint; the report lands in $OUT (or runs/gpu-family).
#
#   DEPTHS=6,4,2 GPUS_PER_WORKER=0.33 bash benchmarks/family_run.sh
#
# Trials run three at a time on the one GPU (0.33 GPU each): a small model leaves an H100 partly idle,
# and one trial's startup and torch.compile overlap another's training. Longest first.
set -euo pipefail
OUT=${OUT:-runs/gpu-family}
mkdir -p "$OUT"
site=$(python -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
source="files:/usr/**/*.py,/tmp/site/**/*.py,$site/**/*.py"
export NANORAY_BIGBENCH_DIR=${NANORAY_BIGBENCH_DIR:-$PWD/.cache/bigbench-core6}
python - "$source" <<'PY'
import glob, os, sys
files = {p for g in sys.argv[1].removeprefix("files:").split(",") for p in glob.glob(g, recursive=True) if os.path.isfile(p)}
print(f"source: {len(files)} files, {sum(os.path.getsize(p) for p in files) / 1e6:.0f} MB", flush=True)
PY
rc=0
python jobs/miniseries.py --name gpu-family --preset gpt2 --depths "${DEPTHS:-6,4,2}" --ratio "${RATIO:-12}" \
    --gpus-per-worker "${GPUS_PER_WORKER:-0.33}" --source "$source" --core core-lite --out "$OUT/report" \
    --storage "$PWD/runs/sweeps" > "$OUT/job.log" 2>&1 || rc=$?
grep -E "^(trial|d[0-9]|total|CORE|fit|report|warning)|Error" "$OUT/job.log" || true  # the summary; all of it in job.log
exit $rc
