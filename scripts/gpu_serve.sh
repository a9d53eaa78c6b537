#!/usr/bin/env bash
# The server issue's device run: `numbaformer serve` and llama.cpp's `llama-server` on the same
# 8B-shaped Q4_K file, each driven by scripts/bench_serve.py at 1, 16 and 64 concurrent streams.
#
#   here (no GPU):  bash scripts/gpu_side_by_side.sh prep   (.gpu-carry: llama.cpp, device env)
#                   bash scripts/gpu_serve.sh prep          (.gpu-carry/serve-wheels: the server's
#                   packages the device image lacks, cp312 wheels, ~4 MB; fastapi
#                   0.165 imports opentelemetry-api)
#   on the device:  bash scripts/gpu_serve.sh run           (carry .gpu-carry)
#                   starts the llama.cpp build, writes the file, starts `numbaformer serve -np 64`,
#                   checks one greedy request streamed and not (the same text), runs bench_serve.py
#                   at CONC (default "1 16 64"; 2 x c requests, at least 8, 128 prompt and 128
#                   output tokens), stops it with SIGTERM (its exit code printed), then the same
#                   against llama-server; a table of both last. NF_ARGS: more options for
#                   numbaformer serve (e.g. "--decode-steps 4"); SAMPLED=1: also the last
#                   concurrency with sampled requests (temperature 0.8, top-p 0.9, seeded; row
#                   "s64" of the table).
# About 8 minutes on an H200 (the llama.cpp build takes ~5 of them, beside numbaformer's part).
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
carry=.gpu-carry
wheels=$carry/serve-wheels
case "${1:-}" in
  prep)
    mkdir -p "$wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$wheels" \
      fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 \
      annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 \
      typing-extensions==4.16.0 uvicorn==0.55.0 h11==0.16.0 anyio==4.16.0 sniffio==1.3.1 \
      idna==3.20 httpx==0.29.0 httpcore==1.0.9 certifi==2026.10.19.post1 \
      prometheus-client==0.26.0 opentelemetry-api==1.45.2 importlib-metadata==10.2.0 zipp==4.1.2
    du -sh "$wheels" ;;
  run)
    export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
    S=$carry/shared
    dev=${DEVICE:-cuda}
    if [ "$dev" = cuda ]; then
      # shellcheck disable=SC1091
      source "$S/gpu/device-env.sh" >/dev/null || { echo "error: device env failed"; exit 2; }
      python3 -m pip install -q --no-deps --no-index "$wheels"/*.whl 2>&1 | grep -v -i warning
      [ -d /tmp/llamacpp/llama.cpp ] || bash "$S/gpu/llamacpp.sh" build "$carry/llamacpp-src.tgz" >/dev/null
    fi
    python3 -c "import fastapi, uvicorn, httpx, prometheus_client" || exit 2
    f=${MODEL:-/tmp/l8-Q4_K.gguf}       # (MODEL=... DEVICE=cpu: numbaformer's part on this machine)
    [ -f $f ] || python3 scripts/make_synthetic_gguf.py --preset llama3-8b --type Q4_K \
        --output-type Q6_K -o $f >/dev/null 2>&1
    conc=${CONC:-1 16 64}
    wait_up() {   # url, seconds
      for _ in $(seq "$2"); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$1/health")" = 200 ] && return 0; sleep 1
      done; return 1
    }
    bench() {     # name, url
      for c in $conc; do
        n=$((2 * c)); [ $n -lt 8 ] && n=8
        echo "== $1, $c concurrent streams, $n requests"
        timeout 200 python3 scripts/bench_serve.py --url "$2" -c "$c" -n "$n" --input-len 128 \
          --output-len 128 --json > "/tmp/serve-$1-$c.json" 2>/tmp/serve-bench.err \
          || tail -3 /tmp/serve-bench.err
        python3 -c "import json,sys; print(json.load(open(sys.argv[1])))" "/tmp/serve-$1-$c.json" \
          2>/dev/null | cut -c1-400
      done
      if [ "${SAMPLED:-0}" = 1 ]; then      # chat-like requests: temperature 0.8, top-p 0.9, seeded
        c=${conc##* }; n=$((2 * c))
        echo "== $1, $c concurrent sampled streams, $n requests"
        timeout 200 python3 scripts/bench_serve.py --url "$2" -c "$c" -n "$n" --input-len 128 \
          --output-len 128 --temperature 0.8 --json > "/tmp/serve-$1-s$c.json" \
          2>/tmp/serve-bench.err || tail -3 /tmp/serve-bench.err
      fi
    }
    echo "== numbaformer serve -np 64"
    python3 -m numbaformer.cli serve -m $f --device "$dev" -np 64 -c 4096 --max-batched-tokens 8192 \
      --max-queue 256 --port 8081 ${NF_ARGS:-} > /tmp/nf-serve.log 2>&1 &
    nf=$!
    if wait_up http://127.0.0.1:8081 300; then
      body='{"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}'
      a=$(curl -s http://127.0.0.1:8081/v1/completions -H 'content-type: application/json' -d "$body" \
          | python3 -c "import json,sys; print(json.load(sys.stdin)['choices'][0]['text'])")
      b=$(curl -sN http://127.0.0.1:8081/v1/completions -H 'content-type: application/json' \
          -d "${body%\}}, \"stream\": true}" | python3 -c "
import json, sys
out = []
for line in sys.stdin:
    line = line.strip()
    if line.startswith('data: ') and line != 'data: [DONE]':
        out.append(json.loads(line[6:])['choices'][0]['text'])
print(''.join(out))")
      [ "$a" = "$b" ] && echo "streamed text = non-streamed text (24 greedy tokens)" \
        || echo "MISMATCH: [$a] vs [$b]"
      bench numbaformer http://127.0.0.1:8081
      curl -s http://127.0.0.1:8081/metrics | grep -E "^numbaformer_(kv_blocks|requests)" | head -6
    else
      echo "numbaformer serve did not come up:"; tail -5 /tmp/nf-serve.log
    fi
    kill -TERM $nf; wait $nf; echo "numbaformer serve exit code after SIGTERM: $?"
    [ "$dev" = cuda ] || exit 0
    BIN=$(bash "$S/gpu/llamacpp.sh" wait) || exit 1
    fa="-fa on"; "$BIN/llama-server" --help 2>&1 | grep -q -- "--flash-attn \[on" || fa="-fa"
    echo "== llama-server -np 64 ($fa)"
    "$BIN/llama-server" -m $f -ngl 99 $fa -np 64 -c $((64 * 4096)) --port 8082 \
      > /tmp/ll-serve.log 2>&1 &
    ll=$!
    if wait_up http://127.0.0.1:8082 300; then
      bench llama-server http://127.0.0.1:8082
    else
      echo "llama-server did not come up:"; tail -5 /tmp/ll-serve.log
    fi
    kill -TERM $ll; wait $ll
    python3 - $conc <<'PY'
import json, sys
keys = ("failed", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
print("| server | streams | " + " | ".join(keys) + " |")
print("|---|---:|" + "---:|" * len(keys))
for c in sys.argv[1:] + ["s" + sys.argv[-1]]:        # s64: the sampled run (SAMPLED=1)
    for name in ("numbaformer", "llama-server"):
        try:
            r = json.load(open(f"/tmp/serve-{name}-{c}.json"))
        except (OSError, ValueError):
            continue
        print(f"| {name} | {c} | " + " | ".join(
            f"{r[k]:.1f}" if isinstance(r.get(k), float) else str(r.get(k, "-")) for k in keys)
            + " |")
PY
    ;;
  *) sed -n 2,14p "$0"; exit 2 ;;
esac
