#!/usr/bin/env bash
# numbaformer and llama.cpp side by side on the same random-weight files, in one device run.
#
#   here (no GPU):  bash scripts/gpu_side_by_side.sh prep
#                   packs llama.cpp's source (shared/gpu/llamacpp.sh) and SmolLM2's tokenizer (the
#                   header of the real file, 1.8 MB) into .gpu-carry/, with shared/gpu (device-env.sh,
#                   the gguf and pytest-xdist wheels): name .gpu-carry in the device call's carry
#                   (~14 MB).
#   on the device:  bash scripts/gpu_side_by_side.sh run [TYPES]   (TYPES default Q4_K,Q5_K,Q6_K,Q8_0,Q4_0)
#                   starts the llama.cpp build, writes the Llama-3-8B-shaped files (Q4_K's output
#                   Q6_K, the others' their own type) and the SmolLM2-shaped Q4_1 file, times the
#                   mat-vecs per type (gpu_bench.py), then `numbaformer bench --kernels` and
#                   `llama-bench -fa 1` on every file, pp4096 of both on the first 8B file; the
#                   tables are the last lines printed. Environment: GEMV=0 skips the mat-vec
#                   timings, LONG=0 the pp4096 pair, MMA=1 runs the GEMM microbenchmark
#                   (gpu_mma_check.py, Q4_K, the prefill issue's gate) while the files are written,
#                   WIDE=1 the widened-weights GEMM's (gpu_wide_check.py, Q4_K and Q8_0, its tiles),
#                   SMOLX=1 the SmolLM2 file's pp512 also without the wide path and with widened
#                   weights kept resident (NUMBAFORMER_WIDE_RESIDENT_MB=512) and its prefill op by
#                   op (gpu_profile.py), TTFT=1 the first 8B file's time to first token of a
#                   2,000-token prompt (gpu_ttft.py) and llama.cpp's pp2000,
#                   TESTS=1 the GPU op tests (pytest -m cuda, TESTS_S seconds at most) meanwhile,
#                   QUIET=1 starts numbaformer's benches only once the llama.cpp build is done (the
#                   build's 16 processes slow a host-bound prefill), SMOL=0 leaves the SmolLM2 file
#                   out, CHECK=1 checks FastKernel's results against numba's launch on the SmolLM2
#                   file (gpu_launch_check.py) and times its pp512 with NUMBAFORMER_FAST_LAUNCH=0.
# About 7 minutes on an H200 (the llama.cpp build takes ~5 of them, beside the other steps).
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
carry=.gpu-carry
case "${1:-}" in
  prep)
    mkdir -p "$carry/shared"
    shared=${NUMBAFORMER_SHARED:-$here/../shared}
    cp -r "$shared/gpu" "$carry/shared/"
    # pytest-xdist for the GPU test runs (gpu_check.sh); device-env.sh installs every wheel there
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 pytest-xdist==3.8.0 execnet==2.1.2 \
        -d "$carry/shared/gpu/wheels" || echo "(no pytest-xdist wheel: GPU tests on one process)"
    [ -f "$carry/llamacpp-src.tgz" ] || bash "$shared/gpu/llamacpp.sh" pack "$carry"
    python3 - "$carry/smollm2-vocab.gguf" <<'PY'
import sys
from numbaformer.fetch import fetch_model
from numbaformer.synthetic import raw_header_len
buf = open(fetch_model(quiet=True), "rb").read(16 << 20)
open(sys.argv[1], "wb").write(buf[:raw_header_len(buf)])
PY
    du -sh "$carry" ;;
  run)
    types=${2:-Q4_K,Q5_K,Q6_K,Q8_0,Q4_0}
    export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
    S=$carry/shared
    # shellcheck disable=SC1091
    source "$S/gpu/device-env.sh" >/dev/null || { echo "error: device env failed"; exit 2; }
    # (an earlier step of the same device call may have started the build already)
    [ -d /tmp/llamacpp/llama.cpp ] || bash "$S/gpu/llamacpp.sh" build "$carry/llamacpp-src.tgz" >/dev/null
    files=""
    for t in ${types//,/ }; do files="$files /tmp/l8-$t.gguf"; done
    smol=/tmp/s135-Q4_1.gguf
    tf=/tmp/l8-${TTFT_TYPE:-${types%%,*}}.gguf        # TTFT=1's file (TTFT_TYPE: another type's)
    [ "${SMOL:-1}" = 0 ] || files="$files $smol"
    gen() { python3 scripts/make_synthetic_gguf.py "$@" >/dev/null 2>&1; }
    rm -f /tmp/side-by-side.gen
    (for t in ${types//,/ }; do o=$t; [ "$t" = Q4_K ] && o=Q6_K
       [ -f "/tmp/l8-$t.gguf" ] || gen --preset llama3-8b --type "$t" --output-type "$o" -o "/tmp/l8-$t.gguf" &
     done
     [ -f /tmp/s135-Q4_1.gguf ] || gen --preset smollm2-135m --type Q4_1 --output-type Q8_0 \
         -o /tmp/s135-Q4_1.gguf --vocab-from "$carry/smollm2-vocab.gguf"
     wait
     touch /tmp/side-by-side.gen) &
    [ "${GEMV:-1}" = 0 ] || \
      python3 scripts/gpu_bench.py --paths fast --gemm-types "" 2>&1 | grep "^device\|gemv" | tail -30
    [ "${MMA:-0}" = 1 ] && python3 scripts/gpu_mma_check.py --types Q4_K --check-types Q4_K \
      --budget 240 2>&1 | tail -25
    [ "${WIDE:-0}" = 1 ] && python3 scripts/gpu_wide_check.py --types Q4_K,Q8_0 --budget 150 \
      --variants 128x128x4x4/64/3,256x128x4x4/32/3,64x128x2x4/32/4 2>&1 | sed -n '/== wide/,$p'
    if [ "${TESTS:-0}" = 1 ]; then
      workers=""; python3 -c "import xdist" 2>/dev/null && workers="-n 4"
      echo "== GPU tests"
      NUMBAFORMER_TEST_GPU=1 timeout "${TESTS_S:-240}" python3 -m pytest -q -m cuda $workers \
        -p no:cacheprovider tests/test_cuda_graph.py tests/test_cuda_ops.py tests/test_cuda_mma.py \
        tests/test_cuda_matmul_mma.py tests/test_cuda_matmul_wide.py tests/test_cuda_flash.py \
        tests/test_cuda_paged.py 2>&1 \
        | grep -E "passed|failed|FAILED|Error" | tail -12
      echo "(pytest rc ${PIPESTATUS[0]})"
    fi
    until [ -f /tmp/side-by-side.gen ]; do sleep 2; done
    if [ "${CHECK:-0}" = 1 ]; then
      echo "== FastKernel against numba's launch, $smol"
      NUMBAFORMER_FAST_LAUNCH=0 timeout 120 python3 scripts/gpu_launch_check.py $smol \
        --save /tmp/launch-numba.npz 2>&1 | tail -1
      timeout 120 python3 scripts/gpu_launch_check.py $smol --save /tmp/launch-fast.npz \
        --against /tmp/launch-numba.npz 2>&1 | tail -2
    fi
    [ "${QUIET:-0}" = 1 ] && { BIN=$(bash "$S/gpu/llamacpp.sh" wait) || exit 1; }
    if [ "${CHECK:-0}" = 1 ]; then
      echo "== numbaformer $smol, numba's launches (NUMBAFORMER_FAST_LAUNCH=0)"
      NUMBAFORMER_FAST_LAUNCH=0 timeout 100 python3 -m numbaformer.cli bench -m $smol \
        --device cuda -p 512 -n 128 -r 2 2>/dev/null | grep -E "pp512|tg128"
    fi
    for f in $files; do
      echo "== numbaformer $f"
      timeout 150 python3 -m numbaformer.cli bench -m "$f" --device cuda -p 512 -n 128 -r 2 --kernels \
        2>/dev/null | grep -E "pp512|tg128|kernel launches|\| total"
    done
    if [ "${SMOLX:-0}" = 1 ]; then
      for v in NUMBAFORMER_WIDE=0 NUMBAFORMER_WIDE_RESIDENT_MB=512; do
        echo "== numbaformer $smol, $v"
        env $v timeout 100 python3 -m numbaformer.cli bench -m $smol --device cuda -p 512 -n 0 \
          -r 3 2>/dev/null | grep pp512
      done
    fi
    if [ "${SMOLX:-0}" = 1 ]; then
      echo "== $smol: a 512-token prefill op by op (graph-timed GPU time against the wall)"
      timeout 120 python3 scripts/gpu_profile.py $smol --ctx 4096 --prefill 512 --no-decode \
        2>&1 | grep -v "^$" | grep -v -i warn | head -40
    fi
    if [ "${TTFT:-0}" = 1 ]; then
      echo "== time to first token, 2,000-token prompt, $tf"
      timeout 150 python3 scripts/gpu_ttft.py -m "$tf" --device cuda \
        -p 2000 -r 5 2>&1 | tail -2
    fi
    BIN=$(bash "$S/gpu/llamacpp.sh" wait) || exit 1
    [ "${TTFT:-0}" = 1 ] && "$BIN/llama-bench" -m "$tf" -ngl 99 -fa 1 \
      -p 2000 -n 0 -r 2 2>&1 | grep -E "pp2000"
    for f in $files; do
      echo "== llama.cpp $f"
      "$BIN/llama-bench" -m "$f" -ngl 99 -fa 1 -p 512 -n 128 -r 2 2>&1 | grep -E "pp512|tg128"
    done
    [ "${LONG:-1}" = 0 ] && exit 0
    # long prompts (the prefill issue's pp4096) on the first 8B file, both engines
    f=/tmp/l8-${types%%,*}.gguf
    echo "== numbaformer pp4096 $f"
    timeout 150 python3 -m numbaformer.cli bench -m "$f" --device cuda -p 4096 -n 0 -r 2 \
      2>/dev/null | grep -E "pp4096"
    echo "== llama.cpp pp4096 $f"
    "$BIN/llama-bench" -m "$f" -ngl 99 -fa 1 -p 4096 -n 0 -r 2 2>&1 | grep -E "pp4096" ;;
  *) sed -n 2,14p "$0"; exit 2 ;;
esac
