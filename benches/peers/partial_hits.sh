#!/usr/bin/env bash
# A before/after of a server change on issue #17's intrinsic table: the call's TTFT at ~1,000 /
# 1,900 / 3,700 tokens, idle, f32 K/V, an OLD and a NEW alora binary alternating with
# llama-server (same aLoRA as GGUF) in between; prints per length the median TTFT, base-turn
# TPOT and prompt tokens the call computed (prompt - cached).
#
#   OLD=/tmp/old/alora LLAMA_SERVER=/path/to/llama-server PYTHON=venv/bin/python \
#     N=12 ROUNDS=1 benches/peers/partial_hits.sh [OUT_DIR]
#
# OLD_ARGS / NEW_ARGS are extra `alora serve` flags (one binary both ways: OLD=target/release/alora
# OLD_ARGS=--no-close-turns), BENCH_ARGS extra alora-bench flags for every server
# (BENCH_ARGS=--no-ignore-eos: turns stop at EOS, so replies come back as the model ended them).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/partial-hits}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
LLAMA_SERVER=${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}
OLD=${OLD:?set OLD to the alora binary to compare against}
NEW=${NEW:-target/release/alora}
OLD_ARGS=${OLD_ARGS:-}
NEW_ARGS=${NEW_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:-}
PYTHON=${PYTHON:-python3}
BENCH=${BENCH:-target/release/alora-bench}
N=${N:-12}
ROUNDS=${ROUNDS:-1}
ALL="--num-prompts $N --conversation-lengths 1000,1900,3700"
mkdir -p "$OUT"; A="$OUT/adapters"; rm -rf "$A"; mkdir -p "$A"
PID=
cp -r demo/topic-alora "$A/topic"
"$PYTHON" benches/peers/peft_to_gguf.py "$A/topic" "$A/topic.gguf" --heads 9 --kv-heads 3
trap 'kill $PID 2>/dev/null || true' EXIT
wait_up() { for _ in $(seq 600); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.5; done; return 1; }
run() { local label=$1 url=$2; shift 2
  "$BENCH" run --base-url "$url" --workload intrinsics --adapter topic \
    --turns 1 --output-len 32 --intrinsic-output-len 4 --concurrency 1 --seed 21 --warmup 1 --no-progress \
    --label "$label" --result-json "$OUT/$label.json" $BENCH_ARGS "$@" > "$OUT/$label.txt"; }
alora() { "$2" serve --model "$MODEL" --port 8000 --no-demo-adapter --adapter topic="$A/topic" $3 >"$OUT/$1.log" 2>&1 &
  PID=$!; wait_up http://127.0.0.1:8000; run "$1" http://127.0.0.1:8000 $ALL; kill $PID; wait $PID 2>/dev/null || true; }
alora old1 "$OLD" "$OLD_ARGS"
alora new1 "$NEW" "$NEW_ARGS"
"$LLAMA_SERVER" -m "$MODEL" -t 2 -np 1 -c 8192 --port 8081 --no-prefill-assistant --lora "$A/topic.gguf" >"$OUT/llama.log" 2>&1 &
PID=$!; wait_up http://127.0.0.1:8081; run llama http://127.0.0.1:8081 --adapter-field lora $ALL; kill $PID; wait $PID 2>/dev/null || true
NAMES="old1 new1 llama"
if [ "$ROUNDS" -gt 1 ]; then
  alora old2 "$OLD" "$OLD_ARGS"
  alora new2 "$NEW" "$NEW_ARGS"
  NAMES="$NAMES old2 new2"
fi
"$PYTHON" - "$OUT" $NAMES <<'PY'
import json, statistics as st, sys
out = sys.argv[1]
names = sys.argv[2:]
rows = {}
for n in names:
    recs = json.load(open(f"{out}/{n}.json"))["records"]
    for L in sorted({r["length"] for r in recs}):
        calls = [r for r in recs if r["ok"] and r["kind"] == "intrinsic" and r["length"] == L]
        base = [(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) * 1e3 for r in recs
                if r["ok"] and r["kind"] == "base" and r["length"] == L and r["output_tokens"] > 1]
        ttft = st.median([r["ttft"] * 1e3 for r in calls])
        comp = st.median([r["prompt_tokens"] - (r.get("cached_tokens") or 0) for r in calls])
        rows.setdefault(L, {})[n] = (ttft, st.median(base), comp, st.median([r["prompt_tokens"] for r in calls]))
for L, r in sorted(rows.items()):
    print(L, " | ".join(f"{n}: TTFT {v[0]:.1f} ms TPOT {v[1]:.2f} computed {v[2]:.0f} of {v[3]:.0f}" for n, v in r.items()))
PY
