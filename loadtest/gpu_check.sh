#!/usr/bin/env bash
# The speech engine's device check (issue 14): one prepared run for one H200 (torch 2.11 and transformers 5.17 there;
# no vLLM, Ray, Redis or internet), sized to finish in under 8 minutes. Everything lands under $OUT.
#
#   bash loadtest/gpu_check.sh prepare     # here, with PyPI: the wheels the engine imports beyond torch/transformers
#                                          # (pydantic, soxr, soundfile) into .whl/ (git-ignored), for Python 3.12 x86-64
#   bash loadtest/gpu_check.sh             # there (the device tool: carry [".whl"]), or on any CUDA machine
#   bash loadtest/gpu_check.sh --dry-run   # anywhere: the same steps on the CPU at toy sizes, to check the script
#
# Steps: (1) tests/test_engine_cuda.py: CUDA-graph frames equal the padded eager step's (float32, bfloat16) and, in
# float32, the eager engine's and the offline loop's; codec graph chunks likewise. (2) loadtest/bench_engine.py at
# Chroma-4B size, RANDOM weights, bfloat16, with the codec: eager and CUDA graphs at batch 1 (the >= 3x target),
# then graphs at concurrency 1, 8, 32, 64, 128, 256 -> $OUT/bench-batch1.json, $OUT/bench.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# pydantic for the settings; soxr and soundfile (with cffi) for model.processing, which the offline loop imports.
WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  soxr==1.1.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12"

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
    DEVICE=cpu DTYPE=float32 SIZE=tiny LEVELS=1,2 FRAMES=8 MODES=eager,padded STAGGER=5 TEST_TIMEOUT=600 WHEELS_HERE=0
    ;;
  run)
    DEVICE=cuda DTYPE=bfloat16 SIZE=full LEVELS=1,8,32,64,128,256 FRAMES=100 MODES=cuda_graphs,eager STAGGER=5 TEST_TIMEOUT=150 WHEELS_HERE=1
    ;;
  *) echo "usage: $0 [prepare|--dry-run]" >&2; exit 2 ;;
esac

# The carried wheels are for the device's Python 3.12; a dry run uses the interpreter's own packages.
if [ "$WHEELS_HERE" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() { echo "== $*"; }

step "environment"
{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; $PY -c "import torch, transformers, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'pydantic', pydantic.__version__)"; } 2>&1 | tee "$OUT/environment.txt"
# The engines import neither Ray, vLLM nor Redis.
$PY -c "
import sys, model.engines.speech, model.engines.codec
loaded = sorted(m for m in ('ray', 'vllm', 'redis') if m in sys.modules)
sys.exit(f'engine imports pulled in {loaded}' if loaded else 0)" || status=1

step "engine tests on $DEVICE (skipped without CUDA)"
timeout "$TEST_TIMEOUT" $PY -m pytest -q --noconftest -p no:cacheprovider -o addopts="" tests/test_engine_cuda.py -rs 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

bench() {
  local timeout_s=$1 log=$2
  shift 2
  timeout "$timeout_s" $PY loadtest/bench_engine.py --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" --codec \
    --frames "$FRAMES" --stagger-ms "$STAGGER" "$@" 2>&1 | tee "$log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
}
step "bench: eager vs CUDA graphs at batch 1, with the offline baselines"
bench 150 "$OUT/bench-batch1.log" --step-modes "$MODES" --concurrency 1 --baselines upstream,speak_turn --json "$OUT/bench-batch1.json"
step "bench: concurrency $LEVELS"
bench 240 "$OUT/bench.log" --step-modes "${MODES%%,*}" --concurrency "$LEVELS" --baselines "" --json "$OUT/bench.json"

step "done (status $status); files in $OUT"
ls -l "$OUT"
exit $status
