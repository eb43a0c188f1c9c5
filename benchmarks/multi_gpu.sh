#!/usr/bin/env bash
# Issue 7 on a machine of several GPUs, one step per call (each fits a 10-minute call):
#
#   STEP=throughput DEPTHS=12 bash benchmarks/multi_gpu.sh   # 1 worker, then all GPUs: scaling efficiency
#   STEP=packed bash benchmarks/multi_gpu.sh                 # a family, one GPU per trial, trials side by side
#   STEP=spread bash benchmarks/multi_gpu.sh                 # the same family, every trial on all GPUs
#   STEP=kill bash benchmarks/multi_gpu.sh                   # a worker SIGKILLed mid-trial on all GPUs
#
# Every step samples GPU utilization (nvidia-smi, 0.5 s) into $OUT/gpu_util_<step>.csv and prints the
# mean busy fraction. JSON lines go to stdout and $OUT. NVLink multicast stays off (KINDS.md).
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-runs/multi-gpu}
mkdir -p "$OUT"
GPUS=$(nvidia-smi -L | wc -l)
STEP=${STEP:?STEP=throughput|packed|spread|kill}
FAMILY=${FAMILY:-4,6,8,10}
RATIO=${RATIO:-4}
DEPTHS=${DEPTHS:-12,20}
PRESET=${PRESET:-gpt2}  # tiny: a CPU smoke run of this script (with a stand-in nvidia-smi)
echo "step $STEP on $GPUS GPUs"

nvidia-smi --query-gpu=index,utilization.gpu --format=csv,noheader,nounits -lms 500 > "$OUT/gpu_util_$STEP.csv" &
sampler=$!
trap 'kill $sampler 2>/dev/null || true' EXIT
busy() {  # mean utilization over the samples, all GPUs
  python -c "import sys; v=[float(l.split(',')[1]) for l in open(sys.argv[1]) if ',' in l]; \
print(f'gpu busy fraction: {sum(v) / max(1, len(v)) / 100:.3f} over {len(v)} samples')" "$OUT/gpu_util_$STEP.csv"
}

case $STEP in
  throughput)
    for depth in ${DEPTHS//,/ }; do
      steps=$([ "$depth" -ge 20 ] && echo "--steps 12 --log-every 3" || echo "--steps 25 --log-every 5")
      one=$(python benchmarks/train_throughput.py --preset "$PRESET" --depth "$depth" $steps | tail -1)
      echo "$one" | tee -a "$OUT/throughput.jsonl"
      base=$(echo "$one" | python -c "import json, sys; print(json.loads(sys.stdin.read())['tok_per_s'])")
      python benchmarks/train_throughput.py --preset "$PRESET" --depth "$depth" $steps --workers "$GPUS" \
        --baseline-tok-per-s "$base" \
        | tail -1 | tee -a "$OUT/throughput.jsonl"
    done ;;
  packed|spread)
    workers=$([ "$STEP" = packed ] && echo 1 || echo "$GPUS")
    start=$(date +%s)
    python jobs/miniseries.py --name "$STEP" --preset "$PRESET" --depths "$FAMILY" --ratio "$RATIO" \
      --workers-per-trial "$workers" --core none --source stdlib --out "$OUT/$STEP" --storage "$PWD/runs/sweeps" \
      > "$OUT/$STEP.log" 2>&1
    grep -E "^(trial|d[0-9]|total|fit|report)" "$OUT/$STEP.log" || true
    python -c "import json, sys; print(json.dumps(dict(step=sys.argv[1], gpus=int(sys.argv[2]), workers_per_trial=int(sys.argv[3]), \
family=sys.argv[4], ratio=float(sys.argv[5]), job_wall_s=int(sys.argv[6]))))" \
      "$STEP" "$GPUS" "$workers" "$FAMILY" "$RATIO" "$(( $(date +%s) - start ))" | tee -a "$OUT/family.jsonl" ;;
  kill)
    python benchmarks/kill_worker.py --checkpoint-every 20 -- --preset "$PRESET" --depths "${KILL_DEPTH:-8}" --ratio 2 \
      --workers-per-trial "$GPUS" --core none --source stdlib > "$OUT/kill.log" 2>&1 || true
    grep -E "killed Train|resumed from" "$OUT/kill.log" || true
    tail -1 "$OUT/kill.log" | tee -a "$OUT/kill.jsonl" ;;
  *) echo "STEP: throughput, packed, spread or kill; got $STEP" >&2; exit 2 ;;
esac
busy
