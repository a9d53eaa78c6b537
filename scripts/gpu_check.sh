#!/usr/bin/env bash
# Everything the GPU must pass, run on the lent GPU machine from the repository root:
#   bash scripts/gpu_check.sh [--quick] [--sanitize]
# Needs: shared/ (the reference folder) inside the checkout or beside it, and for the model-level
# checks the 8-block SmolLM2 cut at .models/smollm2-8l.gguf (shared/scripts/truncate_gguf.py).
# Prints a short summary table last; logs go to ${OUT:-/tmp}/gpu_check.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
shared=${NUMBAFORMER_SHARED:-}
[ -z "$shared" ] && for d in "$here/shared" "$here/../shared"; do [ -d "$d/gpu" ] && shared=$d && break; done
[ -n "$shared" ] || { echo "error: no shared/ folder (set NUMBAFORMER_SHARED)"; exit 2; }
export NUMBAFORMER_SHARED=$shared NUMBAFORMER_TEST_GPU=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
# shellcheck disable=SC1091
source "$shared/gpu/device-env.sh" >/dev/null || { echo "error: device env failed"; exit 2; }
logs=${OUT:-/tmp}/gpu_check
mkdir -p "$logs"
declare -a rows
step() {   # step NAME COMMAND...: run, log, record pass/fail and the last line
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  rows+=("$(printf '%-22s %-4s %4ss  %s' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAIL)" \
            $((SECONDS - t0)) "$(grep -v '^\s*$' "$logs/$name.log" | tail -1 | cut -c1-110)")")
}
# the kernel tests on 4 worker processes when pytest-xdist is there (gpu_side_by_side.sh prep
# carries its wheel in shared/gpu/wheels): their time is mostly numba compiling, one core each
workers=""
python3 -c "import xdist" 2>/dev/null && workers="-n 4"
step ops        python3 -m pytest -q -m cuda $workers tests/test_cuda_ops.py tests/test_cuda_intrinsics.py \
                tests/test_cuda_graph.py tests/test_cuda_mma.py tests/test_cuda_matmul_mma.py \
                tests/test_cuda_flash.py tests/test_cuda_paged.py
step models     python3 -m pytest -q -m cuda -s tests/test_cuda_model.py
step kernels    python3 scripts/gpu_bench.py --paths fast --gemm-types "" --json "$logs/kernels.json"
# the decode mat-vec's prepared variants (off by default until timed): x quantized once per op,
# warps sharing a row pair, K-quant pair units
step probe      python3 scripts/gpu_probe.py --types Q4_K,Q8_0,Q4_1,Q6_K,Q5_K \
                    --variants base,prequant,pq-split2,pq-split4,pairs
# the tensor-core primitives and GEMM (issue 9; the GEMM is opt-in: NUMBAFORMER_MMA=1)
step mma        python3 scripts/gpu_mma_check.py --budget 150 --json "$logs/mma.json"
# flash attention for prefill (issue 9 point 3; opt-in: NUMBAFORMER_FLASH=1)
step flash      python3 scripts/gpu_flash_check.py --budget 150 --json "$logs/flash.json"
if [ "${1:-}" = "--sanitize" ] || [ "${2:-}" = "--sanitize" ]; then
  # compute-sanitizer over the kernel tests at toy sizes (real launch shapes); --error-exitcode
  # turns any report into a failure
  for tool in memcheck racecheck; do
    step "$tool" env NUMBAFORMER_TEST_SMALL=1 compute-sanitizer --tool "$tool" --error-exitcode 3 \
        python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda_ops.py
  done
fi
if [ "${1:-}" != "--quick" ]; then
  python3 scripts/make_synthetic_gguf.py --preset llama3-8b --type Q4_K --output-type Q6_K \
      -o /tmp/llama3-8b-q4_k.gguf >/dev/null 2>&1
  python3 scripts/make_synthetic_gguf.py --preset smollm2-135m --type Q4_1 --output-type Q8_0 \
      -o /tmp/smollm2-135m-q4_1.gguf --vocab-from .models/smollm2-8l.gguf >/dev/null 2>&1
  step bench-8b   python3 -m numbaformer.cli bench -m /tmp/llama3-8b-q4_k.gguf --device cuda -p 512 -n 128 -r 3 --kernels
  step bench-smol python3 -m numbaformer.cli bench -m /tmp/smollm2-135m-q4_1.gguf --device cuda -p 512 -n 128 -r 3 --kernels
fi
echo; echo "gpu_check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)):"
printf '%s\n' "${rows[@]}"
grep -h "pp512\|tg128\|kernel launches\|| total" "$logs"/bench-*.log 2>/dev/null
grep -h "max |dlogprob|\|vs llama.cpp" "$logs/models.log" 2>/dev/null
sed -n '/^probe:/,$p' "$logs/probe.log" 2>/dev/null
tail -12 "$logs/mma.log" 2>/dev/null
! printf '%s\n' "${rows[@]}" | grep -q FAIL
