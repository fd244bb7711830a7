#!/usr/bin/env bash
# The speech engine's device check (issues 14 and 21): one prepared run for one H200 (torch 2.11 and transformers 5.17
# there; no vLLM, Ray, Redis or internet), under 8 minutes: every stage has its own time limit (460 s together). Everything lands
# under $OUT; $OUT/summary.json lists every stage with its status, seconds and, where it failed, the end of its log.
# A failing stage (or a failing level inside a bench) is recorded and the run goes on.
#
#   bash loadtest/gpu_check.sh prepare     # here, with PyPI: the wheels the engines, the offline loop and the
#                                          # one-process turn import beyond what the GPU image has, into .whl/
#                                          # (git-ignored), for Python 3.12 x86-64
#   bash loadtest/gpu_check.sh             # there (the device tool: carry [".whl"]), or on any CUDA machine
#   bash loadtest/gpu_check.sh --dry-run   # anywhere: every stage on the CPU at toy sizes, to check the script
#
# Stages: environment; imports (the engines pull in no Ray, vLLM or Redis); tests (tests/test_engine_cuda.py: graph
# frames equal the padded eager step's in float32 and bfloat16, also at Chroma-4B's head dims (decoder head_dim 128)
# with every bucket of batch 1 to 8 captured; float32 graphs equal the eager engine and the offline loop; codec
# graph chunks likewise); compiled (the same test for torch.compile + graphs); bench-batch1 (bench_engine.py at
# Chroma-4B size, bfloat16, with the codec: padded eager against graphs at batch 1, with the offline baselines,
# the SDPA backend of every captured shape and kernels per step); bench-compiled (compiled_graphs at concurrency 1
# and 8); bench-sweep (graphs and padded eager at concurrency 1, 8, 32, 64, 128, 256, with the codec); turn
# (bench_turn.py: whole turns through LocalTurnBackend with the transformers Reasoner at the real thinker's size,
# TTFA at concurrency 1 and 8).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# pydantic for the settings; soxr and soundfile (with cffi) for model.processing; pydantic-settings, python-dotenv
# and redis (imported, never connected) for cluster.pipeline.local. The GPU image has numpy, pyyaml, anyio,
# prometheus-client and tokenizers.
WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  soxr==1.1.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 pydantic-settings==2.16.3 python-dotenv==1.2.4 redis==8.2.0"

case "${1:-run}" in
  prepare)
    platforms=""
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
      platforms="$platforms --platform $p"
    done
    # shellcheck disable=SC2086
    exec $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl $WHEELS
    ;;
  --dry-run)
    DEVICE=cpu DTYPE=float32 SIZE=tiny FRAMES=12 SWEEP=1,2 MODES=padded,compiled COMPILED_MODE=compiled BACKEND=eager
    STAGGER=5 WHEELS_HERE=0 SCALE=6 ;;  # the CPU is slower: every time limit x SCALE
  run)
    DEVICE=cuda DTYPE=bfloat16 SIZE=full FRAMES=100 SWEEP=1,8,32,64,128,256 MODES=padded,cuda_graphs
    COMPILED_MODE=compiled_graphs BACKEND=inductor STAGGER=5 WHEELS_HERE=1 SCALE=1 ;;
  *) echo "usage: $0 [prepare|--dry-run]" >&2; exit 2 ;;
esac

# The carried wheels are for the device's Python 3.12; a dry run uses the interpreter's own packages.
if [ "$WHEELS_HERE" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "wheel install failed"
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ "$DEVICE" = cpu ] && export CHROMA_CUDA_TESTS_DEVICE=cpu
STAGES="$OUT/stages.jsonl"
: >"$STAGES"
status=0

# stage NAME LIMIT_S COMMAND...: runs it with its log in $OUT/NAME.log, records the outcome, never stops the run.
stage() {
  local name=$1 limit=$(($2 * SCALE)) started rc
  shift 2
  echo "== $name (limit ${limit} s)"
  started=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || status=1
  $PY - "$STAGES" "$name" "$rc" "$started" "$limit" "$OUT/$name.log" <<'EOF'
import json, sys, time
path, name, rc, started, limit, log = sys.argv[1:]
record = {"stage": name, "status": "ok" if rc == "0" else ("timed out" if rc in ("124", "137") else "failed"),
          "exit_code": int(rc), "seconds": round(time.time() - float(started), 1), "limit_s": int(limit)}
if rc != "0":
    record["log_tail"] = open(log, errors="replace").read()[-3000:]
open(path, "a").write(json.dumps(record) + "\n")
EOF
}

bench() {  # bench NAME LIMIT_S ARGS...
  local name=$1 limit=$2
  shift 2
  stage "$name" "$limit" $PY loadtest/bench_engine.py --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" \
    --compile-backend "$BACKEND" --stagger-ms "$STAGGER" --json "$OUT/$name.json" "$@"
}

stage environment 20 bash -c "nvidia-smi 2>/dev/null || echo 'no nvidia-smi'; $PY -c \"import torch, transformers, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'pydantic', pydantic.__version__)\""
stage imports 20 $PY -c "
import sys, model.engines.speech, model.engines.codec
loaded = sorted(m for m in ('ray', 'vllm', 'redis') if m in sys.modules)
sys.exit(f'engine imports pulled in {loaded}' if loaded else 0)"
stage tests 90 $PY -m pytest -q --noconftest -p no:cacheprovider -o addopts="" tests/test_engine_cuda.py -rA -s \
  -k "not compiled"
stage compiled 60 $PY -m pytest -q --noconftest -p no:cacheprovider -o addopts="" tests/test_engine_cuda.py -rA \
  -k compiled
bench bench-batch1 60 --codec --frames "$FRAMES" --step-modes "$MODES" --concurrency 1 --baselines upstream,speak_turn
bench bench-compiled 40 --frames "$FRAMES" --step-modes "$COMPILED_MODE" --concurrency 1,8 --baselines ""
bench bench-sweep 120 --codec --frames $((FRAMES / 2)) --step-modes "${MODES#*,},${MODES%%,*}" --concurrency "$SWEEP" --baselines ""
stage turn 50 $PY loadtest/bench_turn.py --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" --concurrency 1,8 \
  --frames $((FRAMES / 2)) --json "$OUT/turn.json"

$PY - "$STAGES" "$OUT/summary.json" <<'EOF'
import json, sys
stages = [json.loads(line) for line in open(sys.argv[1])]
json.dump({"stages": stages, "failed": [s["stage"] for s in stages if s["status"] != "ok"]}, open(sys.argv[2], "w"), indent=2)
for s in stages:
    print(f"{s['stage']:>15}: {s['status']:<9} {s['seconds']:>6.1f} s (limit {s['limit_s']} s)")
EOF
echo "== done (status $status); files in $OUT"
ls -l "$OUT"
exit $status
