#!/usr/bin/env bash
# Issues 14 and 15's measurements on the lent GPU machine, in stages; a device call (10 min at most, ~2 min of
# it to start a cold machine) runs several. Priority order for a 30-minute session (ask for an H200: the bars are
# H200 figures; session 11's calls all got H100s, whose figures are in RESULTS.md):
#
#   export OUT TESTS="fused_decode or pdl or e5m2 or fp8_training"; timeout 570 bash -c 'bash benchmarks/fp8_windows.sh
#     setup tests; DEPTHS=12 bash benchmarks/fp8_windows.sh serve; bash benchmarks/fp8_windows.sh speed-l' > $OUT/run.log 2>&1
#   (session 14's first call: ~9 min on a cold H200); then, warm: DEPTHS=12 PROFILE_ARGS=--fp8 ... profile, speed-d20
#   Next session, first call (sessions 16-18 got no machine; the fused MLP trained to NaN on an H100 in 15):
#     OUT=$OUT timeout 590 bash benchmarks/fp8_windows.sh setup fused-check > $OUT/run.log 2>&1; tail -c 7000 $OUT/run.log
#   second call, at once (a machine goes back after 30 s idle): `setup attention forward-sweep` (issue 15: the
#   128-row attention's splits/tiles and the engine with the pick; d20's GEMV tiles by the whole forward's time,
#   each kernel kind's cost in the step, the engine with the picks), then d20-bf16. A cold machine needs ~2.5 min
#   before a d12 run's first step (Ray, compile): give each run >= 250 s.
#   OUT=$OUT timeout 570 bash benchmarks/fp8_windows.sh setup speed-l serve > $OUT/run.log 2>&1      # call 1
#   OUT=$OUT timeout 570 bash benchmarks/fp8_windows.sh setup speed-d20 > $OUT/run.log 2>&1          # call 2
#   OUT=$OUT timeout 570 bash benchmarks/fp8_windows.sh setup speed-sssl > $OUT/run.log 2>&1         # call 3
#   CONFIGS=bf16:L,fp8:L SEED=1 bash benchmarks/fp8_windows.sh setup quality-d8   # is d8's fp8 gap one seed's luck?
#   TESTS="pdl" bash benchmarks/fp8_windows.sh setup tests     # a subset of the GPU tests (pytest -k)
#   DEPTHS=12 bash benchmarks/fp8_windows.sh setup decode      # issue 15's PDL A/B of the forward alone
#
# carry: .devbundle (Ray, pydantic...) and .whl/ao: the torchao wheel, and what tests/conftest.py's serve import
# needs beyond .devbundle (fastapi-offline, tokenizers, safetensors), each the version installed here (pip download).
# Each benchmark's JSON lines and logs go to $OUT (or ./runs/out). A device call's limit kills the pipe of a
# trailing `| tail`: send the output to a file under $OUT (`> $OUT/run.log 2>&1`) so the call keeps it.
set -uo pipefail
OUT=${OUT:-runs/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache  # kept while the machine stays warm between calls
tt() { local name=$1; shift; timeout 300 python benchmarks/train_throughput.py "$@" 2>&1 | tee "$OUT/$name.log" | grep -E '^\{|Error|error:' | tail -3; }
q() { local name=$1; shift; timeout 420 python benchmarks/quality.py "$@" 2>&1 | tee "$OUT/$name.log" | grep -E '^\{|Error|corpus ready' ; }
# The quality corpus: the Python sources of torch and of the carried bundle (~80 MB: torch 46, Ray 28; the stdlib alone
# is ~12 MB, 1.7M tokens an epoch: 300 steps of 2^17 tokens would read it 23 times over)
corpus() { echo "files:$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')/**/*.py,/tmp/site/**/*.py"; }
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
  setup)
    bash .devbundle/install.sh >/dev/null
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/ao/*.whl
    python -c "import torch, torchao, ray; print(torch.__version__, torchao.__version__, ray.__version__, torch.cuda.get_device_name())"
    ;;
  tests)
    timeout 240 python -m pytest -q --tb=line tests/test_gpu.py -k "${TESTS:-fp8 or window or compiled_bf16 or pdl or fused_decode_step}" -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | grep -vi warn | tail -12
    ;;
  speed-l)  # the bar's configuration (window L), bf16 against fp8, d12
    tt d12-bf16 --depth 12 --steps 20 --log-every 5 --window-pattern L
    tt d12-fp8 --depth 12 --steps 20 --log-every 5 --fp8 --window-pattern L
    ;;
  speed-d12)  # the bar's d12 pair and SSSL beside it, one machine
    tt d12-bf16 --depth 12 --steps 20 --log-every 5 --window-pattern L
    tt d12-fp8 --depth 12 --steps 20 --log-every 5 --fp8 --window-pattern L
    tt d12-bf16-sssl --depth 12 --steps 20 --log-every 5 --window-pattern SSSL
    ;;
  fast-accum)  # fp8 with fast accumulation also in the backward GEMMs (FAST: NANORAY_FP8_FAST_ACCUM; DEPTH)
    NANORAY_FP8_FAST_ACCUM=${FAST:-output,grad_input} tt d${DEPTH:-12}-fp8-fast --depth ${DEPTH:-12} --steps 20 --log-every 5 --fp8 --window-pattern L
    ;;
  fused-mlp)  # fp8 with each MLP one autograd function, its backward's middle one Triton pass (DEPTH; TRANSPOSES:
    # triton or torch, kernels.RELU2_TRANSPOSES)
    # d20: 8 steps of ~5 s, windows of 2
    steps=$([ "${DEPTH:-12}" = 20 ] && echo "--steps 8 --log-every 2" || echo "--steps 20 --log-every 5")
    NANORAY_FP8_MLP=fused NANORAY_FP8_MLP_TRANSPOSES=${TRANSPOSES:-triton} tt d${DEPTH:-12}-fp8-fused --depth ${DEPTH:-12} $steps --fp8 --window-pattern L
    ;;
  fused-check)  # the fused MLP on the GPU: the kernel's tests (a ragged and an aligned shape; the transposes written
    # by the kernel or by torch), d12 with it, then d20 if d12's loss stays finite, else dev/debug_fused_mlp.py and
    # d12 with the other transposes (~9 min on a cold machine)
    timeout 120 python -m pytest -q --tb=line tests/test_gpu.py -k relu2 -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | grep -vi warn | tail -4
    t=triton; grep -q "FAILED.*shape1-triton\]" "$OUT/tests.log" && t=torch; echo "transposes: $t"
    NANORAY_FP8_MLP=fused NANORAY_FP8_MLP_TRANSPOSES=$t tt d12-fp8-fused --depth 12 --steps 20 --log-every 5 --fp8 --window-pattern L
    if grep -q '"last_loss": [0-9]' "$OUT/d12-fp8-fused.log"; then
      NANORAY_FP8_MLP=fused NANORAY_FP8_MLP_TRANSPOSES=$t tt d20-fp8-fused --depth 20 --steps 8 --log-every 2 --fp8 --window-pattern L
    else
      timeout 90 python dev/debug_fused_mlp.py > "$OUT/debug.log" 2>&1; grep -E "step|finite False" "$OUT/debug.log" | head -24
      other=$([ $t = triton ] && echo torch || echo triton)
      NANORAY_FP8_MLP=fused NANORAY_FP8_MLP_TRANSPOSES=$other tt d12-fp8-fused-$other --depth 12 --steps 20 --log-every 5 --fp8 --window-pattern L
    fi
    ;;
  cdt)  # inductor's coordinate-descent tuning of its generated kernels' tiles (DEPTH; ARGS: e.g. --fp8)
    TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 tt d${DEPTH:-12}-cdt --depth ${DEPTH:-12} --steps 20 --log-every 5 --window-pattern L ${ARGS:---fp8}
    ;;
  torchao-fn)  # fp8 through torchao's own autograd function (an amax of each input again in backward; DEPTH)
    NANORAY_FP8_KEEP_INPUT_SCALE=0 tt d${DEPTH:-12}-fp8-torchao --depth ${DEPTH:-12} --steps 20 --log-every 5 --fp8 --window-pattern L
    ;;
  speed-d20)  # the bar's d20 pair (fp8 first)
    tt d20-fp8 --depth 20 --steps 8 --log-every 2 --fp8 --window-pattern L
    tt d20-bf16 --depth 20 --steps 8 --log-every 2 --window-pattern L
    ;;
  d20-bf16)  # the bar's "bf16 no slower than today" at d20
    tt d20-bf16 --depth 20 --steps 8 --log-every 2 --window-pattern L
    ;;
  d12-bf16)
    tt d12-bf16 --depth 12 --steps 20 --log-every 5 --window-pattern L
    ;;
  speed-sssl)  # SSSL against L on one machine (the windows default waits on this: DESIGN.md)
    tt d12-bf16 --depth 12 --steps 20 --log-every 5 --window-pattern L
    tt d12-bf16-sssl --depth 12 --steps 20 --log-every 5 --window-pattern SSSL
    ;;
  quality-d8)
    q quality-d8 --depth 8 --steps 300 --configs "${CONFIGS:-bf16:L,fp8:L,bf16:SSSL}" --seed "${SEED:-42}" --source "$(corpus)" --data-dir /tmp/quality-data
    ;;
  quality-d12)
    q quality-d12 --depth 12 --steps 300 --configs "${CONFIGS:-bf16:L,fp8:L,bf16:SSSL}" --seed "${SEED:-42}" --source "$(corpus)" --data-dir /tmp/quality-data
    ;;
  decode)  # issue 15: the fused decode step with and without programmatic dependent launch (DEPTHS: "12 20")
    for d in ${DEPTHS:-12 20}; do
      timeout 120 python benchmarks/decode_kernels.py --depth $d --forward-only 2>&1 | tee "$OUT/decode-d$d.log" | grep -E '^\{|Error'
    done
    ;;
  decode-sweep)  # issue 15: lane against tensor-core attention, wide steps through _linear_kernel, GEMV tilings (d20)
    for d in ${DEPTHS:-12 20}; do
      sweep=$([ "$d" = 20 ] && echo --gemv-sweep)
      timeout 270 python benchmarks/decode_kernels.py --depth $d $sweep 2>&1 | tee "$OUT/sweep-d$d.log" | grep -E '^\{|Error'
    done
    ;;
  attention)  # issue 15's 128 streams: the attention's splits and tiles at d12 (1 and 128 rows), then the engine
    # with the fastest at 128 rows against its defaults
    timeout 200 python benchmarks/decode_kernels.py --depth 12 --attention-only > "$OUT/attention-d12.log" 2>&1
    grep -E 'rows": 128|attention_best|Error' "$OUT/attention-d12.log" | cut -c1-150
    best=$(grep attention_best "$OUT/attention-d12.log" | python -c 'import json, sys; print(json.load(sys.stdin)["serve_args"])')
    for args in "$best" ""; do
      timeout 150 python benchmarks/serve_throughput.py --depth 12 $args 2>&1 | tee -a "$OUT/serve-d12.log" | grep -E '^\{|Error'
    done
    ;;
  forward-sweep)  # issue 15's d20 step: the one-row GEMV tiles picked by the whole forward's time, then the
    # engine with the picks against its defaults (DEPTH)
    d=${DEPTH:-20}
    timeout 240 python benchmarks/decode_kernels.py --depth $d --forward-sweep > "$OUT/fsweep-d$d.log" 2>&1
    grep -E 'gemv": "default|forward_without|forward_sweep_best|Error' "$OUT/fsweep-d$d.log" | cut -c1-300
    picks=$(grep forward_sweep_best "$OUT/fsweep-d$d.log" | python -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["picks"], separators=(",", ":")))')
    if [ -n "$picks" ] && [ "$picks" != "{}" ]; then
      for args in "--gemv-picks=$picks" ""; do
        timeout 150 python benchmarks/serve_throughput.py --depth $d $args 2>&1 | tee -a "$OUT/serve-d$d.log" | grep -E '^\{|Error'
      done
    fi
    ;;
  serve)  # issue 15's bar: the engine's whole batch-1 step and 128 streams, d12 and d20
    for d in ${DEPTHS:-12 20}; do
      timeout 200 python benchmarks/serve_throughput.py --depth $d ${SERVE_ARGS:-} 2>&1 | tee -a "$OUT/serve-d$d.log" | grep -E '^\{|Error'
    done
    ;;
  profile)  # one step's GPU time by kernel (DEPTHS: "20"; PROFILE_ARGS: "--fp8")
    for d in ${DEPTHS:-20}; do
      timeout 200 python benchmarks/profile_step.py --depth $d ${PROFILE_ARGS---fp8} --top 25 2>&1 \
        | tee "$OUT/profile-d$d.log" | tail -27
    done
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
echo "=== done $(date +%T)"
