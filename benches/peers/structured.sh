#!/usr/bin/env bash
# Per-token cost of structured outputs: decode with and without a JSON schema, batch 1 and 8,
# alora then llama-server, same model file, threads and machine (BENCHMARKS.md, issue #15).
#
#   LLAMA_SERVER=/path/to/llama-server benches/peers/structured.sh [OUT_DIR]
#
# Each server starts fresh and serves four runs (free c1, json c1, free c8, json c8); every run
# has its own seed, so no run's prompts are in the prefix cache from an earlier one. The schema
# asks for at least 16 objects, more than 64 tokens can hold, so the grammar constrains every
# one of the 64 tokens and never ends the output early.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/structured-bench}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
LLAMA_SERVER=${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}
ALORA=${ALORA:-target/release/alora}
BENCH=${BENCH:-target/release/alora-bench}
mkdir -p "$OUT"

S='{"type":"array","minItems":16,"items":{"type":"object","properties":{"city":{"type":"string","maxLength":16},"temp":{"type":"integer"}},"required":["city","temp"],"additionalProperties":false}}'
X="{\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"cities\",\"schema\":$S}}}"
R="--workload random --input-len 128 --output-len 64 --warmup 1 --no-progress"

wait_up() {
  for _ in $(seq 600); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "server at $1 did not come up" >&2; return 1
}

runs() { # name base_url
  local name=$1 url=$2 seed=0
  for c in 1 8; do
    local n=$([ "$c" = 1 ] && echo 5 || echo 24)
    for mode in free json; do
      seed=$((seed + 1))
      local extra=()
      [ "$mode" = json ] && extra=(--extra-body "$X")
      "$BENCH" run --base-url "$url" $R --concurrency "$c" --num-prompts "$n" --seed "$seed" \
        "${extra[@]}" --label "$name-$mode-c$c" --result-json "$OUT/$name-$mode-c$c.json" \
        | tee "$OUT/$name-$mode-c$c.txt"
    done
  done
}

"$ALORA" serve --model "$MODEL" --port 8000 --no-demo-adapter >"$OUT/alora.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:8000
runs alora http://127.0.0.1:8000
kill $PID; wait $PID 2>/dev/null || true

"$LLAMA_SERVER" -m "$MODEL" -t 2 -np 8 -c 8192 --port 8081 >"$OUT/llama.log" 2>&1 &
PID=$!
wait_up http://127.0.0.1:8081
runs llama http://127.0.0.1:8081
kill $PID; wait $PID 2>/dev/null || true

grep -h -E "^(label|TPOT|TTFT|output)" "$OUT"/*.txt || true
