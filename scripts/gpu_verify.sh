#!/usr/bin/env bash
# One device call that re-verifies the CUDA backend after a change to its launch path or kernels:
#   bash scripts/gpu_verify.sh        (carry .models and .gpu-carry/shared, .gpu-carry/smollm2-vocab.gguf)
# 1. FastKernel (every launch) against numba's launch on a SmolLM2-shaped file: prefill in two
#    passes, greedy decode, the batched engine (scripts/gpu_launch_check.py): the same bits;
# 2. the GPU tests of the launch path, the ops, the paged/batched path and the model (fidelity
#    against llama.cpp's outputs) on 4 workers, TESTS_S seconds at most, a line per test in
#    $OUT/gpu_verify-tests.log (the counts and failures printed even when time runs out);
# 3. with an 8B-shaped Q4_K file written meanwhile, `numbaformer bench --parallel` (BATCHED
#    counts, default 1,16,64), the batched engine's aggregate decode.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
carry=.gpu-carry
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore NUMBAFORMER_SHARED=$here/tests/data
# shellcheck disable=SC1091
source "$carry/shared/gpu/device-env.sh" >/dev/null || { echo "error: device env failed"; exit 2; }
out=${OUT:-/tmp}
smol=/tmp/s135-Q4_1.gguf
f=/tmp/l8-Q4_K.gguf
[ -f $smol ] || python3 scripts/make_synthetic_gguf.py --preset smollm2-135m --type Q4_1 \
    --output-type Q8_0 -o $smol --vocab-from "$carry/smollm2-vocab.gguf" >/dev/null 2>&1
([ -f $f ] || python3 scripts/make_synthetic_gguf.py --preset llama3-8b --type Q4_K \
    --output-type Q6_K -o $f >/dev/null 2>&1; touch /tmp/verify.gen) &
echo "== FastKernel against numba's launch ($smol)"
NUMBAFORMER_FAST_LAUNCH=0 timeout 100 python3 scripts/gpu_launch_check.py $smol \
  --save /tmp/launch-numba.npz > $out/launch-numba.log 2>&1; tail -1 $out/launch-numba.log
timeout 100 python3 scripts/gpu_launch_check.py $smol --save /tmp/launch-fast.npz \
  --against /tmp/launch-numba.npz > $out/launch-fast.log 2>&1; tail -2 $out/launch-fast.log
workers=""; python3 -c "import xdist" 2>/dev/null && workers="-n 4"
echo "== GPU tests"
NUMBAFORMER_TEST_GPU=1 timeout "${TESTS_S:-280}" python3 -m pytest -v -m cuda $workers \
  -p no:cacheprovider tests/test_cuda_graph.py tests/test_cuda_paged.py tests/test_cuda_model.py \
  tests/test_cuda_matmul_wide.py \
  tests/test_cuda_ops.py > $out/gpu_verify-tests.log 2>&1
echo "(pytest rc $?) passed $(grep -c " PASSED" $out/gpu_verify-tests.log), failed" \
  "$(grep -c " FAILED" $out/gpu_verify-tests.log), skipped $(grep -c " SKIPPED" $out/gpu_verify-tests.log)"
grep -E " FAILED|^E " $out/gpu_verify-tests.log | head -20
grep -E "per launch" $out/gpu_verify-tests.log | head -2
until [ -f /tmp/verify.gen ]; do sleep 2; done
echo "== numbaformer bench --parallel ${BATCHED:-1,16,64} $f"
timeout "${BENCH_S:-150}" python3 -m numbaformer.cli bench -m $f --device cuda \
  --parallel "${BATCHED:-1,16,64}" -p 128 -n 64 2>&1 | tail -6
