#!/usr/bin/env bash
# Batched decode (issue 10) on the lent GPU, in two device calls made back to back (the second
# reuses the first's /tmp: the llama.cpp build, the synthetic files, the best rows variant):
#
#   here (no GPU):  bash scripts/gpu_side_by_side.sh prep     (.gpu-carry: llama.cpp, wheels)
#   call 1:         bash scripts/gpu_batched.sh one
#                   writes the SmolLM2-shaped file and times its 512-token prefill's host work by
#                   function (scripts/gpu_profile.py --cprofile; with .gpu-carry/old, pp512 of an
#                   older tree beside this one's), then starts the llama.cpp build, writes the 8B
#                   Q4_K file, times the decode-row kernels at the 8B shapes
#                   (scripts/gpu_rows_bench.py: dp4a rows, the tensor-core rows kernel and its
#                   VERSION 3 at 1 and 2 tiles a warp); the fastest tensor-core variant at 16
#                   rows goes to /tmp/rows-mma-env (its NUMBAFORMER_ROWS_MMA_* settings).
#   call 2:         bash scripts/gpu_batched.sh two
#                   the 8B file's prefill and batched decode steps (16, 64 sequences) op by op
#                   (scripts/gpu_profile.py --batched), `numbaformer bench --parallel 1,4,16,64
#                   -p 128 -n 128` (the default split of decode rows between the kernels, that
#                   tensor-core variant), llama-batched-bench on the same file, bench --parallel
#                   1,16 with one decode step a replay, and pp512 of both engines on the file.
#   or one call:    bash scripts/gpu_batched.sh three
#                   the batched steps op by op (gpu_profile.py --batched), bench --parallel, the
#                   decode rows past CROSS on the widened-weights GEMM, llama-batched-bench.
#   or:             PREGEN="Q5_K .." CROSS=32 bash scripts/gpu_batched.sh four
#                   bench --parallel 1,4,16,64 beside llama-batched-bench, `generate -f
#                   requests.jsonl --parallel 16 --json` on the SmolLM2-shaped file, the 64-row
#                   crossover run, then the 8B files a side-by-side call made next reads
#                   (AB="NUMBAFORMER_ROWS_MMA_MERGE=0": also bench --parallel 1,16 with that).
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
carry=.gpu-carry
S=$carry/shared
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
# shellcheck disable=SC1091
source "$S/gpu/device-env.sh" >/dev/null || { echo "error: device env failed"; exit 2; }
f=/tmp/l8-Q4_K.gguf
case "${1:-}" in
  one)
    [ -f /tmp/s135-Q4_1.gguf ] || python3 scripts/make_synthetic_gguf.py --preset smollm2-135m \
        --type Q4_1 --output-type Q8_0 -o /tmp/s135-Q4_1.gguf \
        --vocab-from "$carry/smollm2-vocab.gguf" >/dev/null 2>&1
    # the prefill regression: the host's time by function, and (with .gpu-carry/old, an older
    # tree: `git archive 459889d numbaformer | tar -x -C .gpu-carry/old`) both trees' pp512
    timeout 120 python3 scripts/gpu_profile.py /tmp/s135-Q4_1.gguf --ctx 4096 --prefill 512 \
      --no-decode --cprofile 2>&1 | grep -v "^$" | head -40
    if [ -d $carry/old ]; then
      for tree in $carry/old .; do
        (cd $tree && PYTHONPATH=$PWD:${PYTHONPATH:-} timeout 150 python3 -m numbaformer.cli bench \
          -m /tmp/s135-Q4_1.gguf --device cuda -p 512 -n 0 -r 3 2>/dev/null | grep pp512 \
          | sed "s|^|$tree: |")
      done
    fi
    # (started after the prefill timings, which the host's load would disturb)
    [ -d /tmp/llamacpp/llama.cpp ] || bash "$S/gpu/llamacpp.sh" build "$carry/llamacpp-src.tgz" >/dev/null
    rm -f /tmp/gen8
    ([ -f $f ] || python3 scripts/make_synthetic_gguf.py --preset llama3-8b --type Q4_K \
        --output-type Q6_K -o $f >/dev/null 2>&1; touch /tmp/gen8) &
    timeout 300 python3 scripts/gpu_rows_bench.py --groups 8 --mma ${MMA:-0,8,8v3t1,8v3t2} \
      --n 1,2,4,8,16,32,64 2>&1 | tee /tmp/rows.txt | tail -12
    python3 - <<'PY' > /tmp/rows-mma-env
import re
best, env = None, "NUMBAFORMER_ROWS_MMA_WARPS=8"
for line in open("/tmp/rows.txt"):
    m = re.match(r"rows mma w=(\d+)( v3 t=(\d))? .* n=16: +([\d.]+) ms", line)
    if m and (best is None or float(m.group(4)) < best):
        best = float(m.group(4))
        env = f"NUMBAFORMER_ROWS_MMA_WARPS={m.group(1)}" + (
            f" NUMBAFORMER_ROWS_MMA_VERSION=3 NUMBAFORMER_ROWS_MMA_TILES={m.group(3)}"
            if m.group(2) else "")
print(env)
PY
    echo "tensor-core rows variant for call 2: $(cat /tmp/rows-mma-env)"
    until [ -f /tmp/gen8 ]; do sleep 2; done ;;
  two)
    v=$(cat /tmp/rows-mma-env 2>/dev/null || echo NUMBAFORMER_ROWS_MMA_WARPS=8)
    # the 8B prefill op by op, then batched decode steps at 16 and 64 sequences: wall time per
    # step, the step's graph alone, its ops one by one
    env $v timeout 240 python3 scripts/gpu_profile.py $f --ctx 4096 --prefill 512 --no-decode \
      --batched 16,64 2>&1 | grep -v "^$" | grep -v Warning | head -60
    echo "== numbaformer bench --parallel ($v)"
    env $v timeout 330 python3 -m numbaformer.cli \
      bench -m $f --device cuda --parallel 1,4,16,64 -p 128 -n 128 2>&1 | tail -8
    BIN=$(bash "$S/gpu/llamacpp.sh" wait) || exit 1
    echo "== llama-batched-bench"
    "$BIN/llama-batched-bench" -m $f -ngl 99 -fa 1 -c 20000 -npp 128 -ntg 128 -npl 1,4,16,64 \
      2>&1 | grep "^|"
    echo "== numbaformer bench --parallel, one step a replay (NUMBAFORMER_BATCH_STEPS=1)"
    env $v NUMBAFORMER_BATCH_STEPS=1 timeout 200 python3 -m numbaformer.cli \
      bench -m $f --device cuda --parallel 1,16 -p 128 -n 128 2>&1 | tail -3
    echo "== pp512"
    timeout 100 python3 -m numbaformer.cli bench -m $f --device cuda -p 512 -n 0 -r 3 2>/dev/null \
      | grep pp512
    "$BIN/llama-bench" -m $f -ngl 99 -fa 1 -p 512 -n 0 -r 3 2>&1 | grep pp512 ;;
  three)
    # one call: the batched decode steps op by op (1, 16, 64 sequences), bench --parallel as it
    # is, then (CROSS="16 32") with the decode rows past 16 or 32 on the widened-weights GEMM
    # (NUMBAFORMER_ROWS_MMA_MAX, NUMBAFORMER_WIDE_MIN_TOKENS; the output head widened too with
    # NUMBAFORMER_WIDE_MAX_MB=1100), beside llama-batched-bench on the same file; PREGEN="Q5_K .."
    # writes those 8B files (and the SmolLM2-shaped one) last, for a side-by-side call made next
    [ -d /tmp/llamacpp/llama.cpp ] || bash "$S/gpu/llamacpp.sh" build "$carry/llamacpp-src.tgz" >/dev/null
    [ -f $f ] || python3 scripts/make_synthetic_gguf.py --preset llama3-8b --type Q4_K \
        --output-type Q6_K -o $f >/dev/null 2>&1
    timeout 240 python3 scripts/gpu_profile.py $f --ctx 4096 --prefill 128 --no-decode \
      --batched ${PROFILE:-1,16,64} 2>&1 | grep -v "^$" | grep -v -i warn | sed -n '/^batched/,$p' \
      | head -${PROFILE_LINES:-90}
    echo "== numbaformer bench --parallel (the default split of decode rows)"
    timeout 200 python3 -m numbaformer.cli bench -m $f --device cuda --parallel ${PAR:-1,4,16,64} \
      -p 128 -n 128 2>&1 | tail -7
    for x in ${CROSS:-}; do
      echo "== rows kernel up to $x rows, the GEMM on widened weights past it (head widened)"
      NUMBAFORMER_ROWS_MMA_MAX=$x NUMBAFORMER_WIDE_MIN_TOKENS=$((x + 1)) \
        NUMBAFORMER_WIDE_MAX_MB=1100 timeout 150 python3 -m numbaformer.cli bench -m $f \
        --device cuda --parallel 32,64 -p 128 -n 128 2>&1 | tail -4
    done
    BIN=$(bash "$S/gpu/llamacpp.sh" wait) || exit 1
    (for t in ${PREGEN:-}; do
       python3 scripts/make_synthetic_gguf.py --preset llama3-8b --type "$t" --output-type "$t" \
         -o /tmp/l8-$t.part >/dev/null 2>&1 && mv /tmp/l8-$t.part /tmp/l8-$t.gguf &
     done
     if [ -n "${PREGEN:-}" ]; then
       python3 scripts/make_synthetic_gguf.py --preset smollm2-135m --type Q4_1 --output-type Q8_0 \
         -o /tmp/s135.part --vocab-from "$carry/smollm2-vocab.gguf" >/dev/null 2>&1 \
         && mv /tmp/s135.part /tmp/s135-Q4_1.gguf
     fi; wait) &
    echo "== llama-batched-bench"
    "$BIN/llama-batched-bench" -m $f -ngl 99 -fa 1 -c 20000 -npp 128 -ntg 128 \
      -npl ${PAR:-1,4,16,64} 2>&1 | grep "^|"
    wait ;;
  four)
    # issue 10's figures in one call, then the files a side-by-side call made next reads:
    # bench --parallel (the default split of decode rows) and llama-batched-bench on the 8B Q4_K
    # file, `generate -f requests.jsonl --parallel 16 --json` on the SmolLM2-shaped file, the
    # 64-sequence run with the decode rows past 32 on the widened-weights GEMM, then (PREGEN)
    # the other 8B files
    [ -d /tmp/llamacpp/llama.cpp ] || bash "$S/gpu/llamacpp.sh" build "$carry/llamacpp-src.tgz" >/dev/null
    s=/tmp/s135-Q4_1.gguf
    [ -f $s ] || python3 scripts/make_synthetic_gguf.py --preset smollm2-135m --type Q4_1 \
        --output-type Q8_0 -o $s --vocab-from "$carry/smollm2-vocab.gguf" >/dev/null 2>&1 &
    [ -f $f ] || python3 scripts/make_synthetic_gguf.py --preset llama3-8b --type Q4_K \
        --output-type Q6_K -o $f >/dev/null 2>&1
    wait
    echo "== numbaformer bench --parallel ${PAR:-1,4,16,64} (the default split of decode rows)"
    /usr/bin/time -f "(%e s)" timeout 330 python3 -m numbaformer.cli bench -m $f --device cuda \
      --parallel ${PAR:-1,4,16,64} -p 128 -n 128 2>&1 | tail -7
    if [ -n "${AB:-}" ]; then        # e.g. AB=NUMBAFORMER_ROWS_MMA_MERGE=0: the same, without
      echo "== numbaformer bench --parallel 1,16 with $AB"
      env $AB timeout 200 python3 -m numbaformer.cli bench -m $f --device cuda --parallel 1,16 \
        -p 128 -n 128 2>&1 | tail -4
    fi
    BIN=$(bash "$S/gpu/llamacpp.sh" wait) || exit 1
    echo "== llama-batched-bench"
    "$BIN/llama-batched-bench" -m $f -ngl 99 -fa 1 -c 20000 -npp 128 -ntg 128 \
      -npl ${PAR:-1,4,16,64} 2>&1 | grep "^|"
    echo "== generate -f requests.jsonl --parallel 16 --json, $s"
    python3 - > /tmp/requests.jsonl <<'PY'
import json
for i in range(24):
    r = {"prompt": f"Request {i}: write about the number {i}.", "max_tokens": 16 + i}
    if i % 3 == 1:
        r = {"messages": [{"role": "user", "content": f"Say {i} twice."}], "max_tokens": 20,
             "temperature": 0.8, "seed": i}
    print(json.dumps(r))
PY
    timeout 120 python3 -m numbaformer.cli generate -m $s --device cuda -f /tmp/requests.jsonl \
      --parallel 16 --json > /tmp/results.jsonl 2>/tmp/gen.err
    echo "rc $?, $(wc -l < /tmp/results.jsonl) result lines for 24 requests; stderr: $(tail -c 300 /tmp/gen.err | tr '\r\n' '  ')"
    python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/results.jsonl")]
print("finish reasons:", sorted({r.get("finish_reason") for r in rows}),
      "tokens:", [len(r.get("ids", ())) for r in rows])
print("first:", json.dumps(rows[0])[:300] if rows else "-")
PY
    (for t in ${PREGEN:-}; do
       python3 scripts/make_synthetic_gguf.py --preset llama3-8b --type "$t" --output-type "$t" \
         -o /tmp/l8-$t.part >/dev/null 2>&1 && mv /tmp/l8-$t.part /tmp/l8-$t.gguf &
     done; wait) &
    for x in ${CROSS:-}; do
      echo "== 64 sequences, the rows kernel up to $x rows, the GEMM on widened weights past it"
      NUMBAFORMER_ROWS_MMA_MAX=$x NUMBAFORMER_WIDE_MIN_TOKENS=$((x + 1)) \
        NUMBAFORMER_WIDE_MAX_MB=1100 timeout 150 python3 -m numbaformer.cli bench -m $f \
        --device cuda --parallel 64 -p 128 -n 128 2>&1 | tail -3
    done
    wait ;;
  *) sed -n 2,22p "$0"; exit 2 ;;
esac
