#!/usr/bin/env bash
# Intrinsic calls and decodes while other conversations prefill (issue #17, item 3): the
# `intrinsics` workload (conversations of ~1,100 prompt tokens, a base turn of 16 tokens out,
# then one `topic` call of 2) closed loop at concurrency 4, so base-turn prefills of some
# conversations run while calls and decodes of others arrive; and the idle call (c1).
#
# Three servers, same model file, threads, machine and conversations (same seed):
#   old  - $OLD (an alora binary from before sliced prefill) with its defaults, or
#          target/release/alora with OLD_ARGS (e.g. "--prefill-slice-ms 0
#          --long-prefill-token-threshold 2048", the old policy) when OLD is unset;
#   new  - target/release/alora with its defaults plus NEW_ARGS;
#   llama - llama-server (-np 4) with the same aLoRA as GGUF (SKIP_LLAMA=1 leaves it out).
# ROUNDS rounds, old and new alternating (llama-server once, in the first round).
#
#   OLD=/tmp/old/alora LLAMA_SERVER=/path/to/llama-server PYTHON=venv/bin/python \
#     benches/peers/sliced_prefill.sh [OUT_DIR]
#
# PYTHON needs `gguf`, `numpy` and `safetensors` (benches/peers/peft_to_gguf.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/sliced-prefill}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
LLAMA_SERVER=${LLAMA_SERVER:-}
if [ "${SKIP_LLAMA:-0}" != 1 ] && [ -z "$LLAMA_SERVER" ]; then
  echo "set LLAMA_SERVER to a llama-server binary (or SKIP_LLAMA=1)" >&2; exit 2
fi
PYTHON=${PYTHON:-python3}
NEW=target/release/alora
OLD=${OLD:-$NEW}
BENCH=${BENCH:-target/release/alora-bench}
ROUNDS=${ROUNDS:-2} N=${N:-12} C=${C:-4}
read -r -a OLD_EXTRA <<<"${OLD_ARGS:-}"
read -r -a NEW_EXTRA <<<"${NEW_ARGS:-}"
mkdir -p "$OUT"
A="$OUT/adapters"
rm -rf "$A" && mkdir -p "$A"
cp -r demo/topic-alora "$A/topic"
"$PYTHON" benches/peers/peft_to_gguf.py "$A/topic" "$A/topic.gguf" --heads 9 --kv-heads 3

wait_up() {
  for _ in $(seq 600); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "server at $1 did not come up" >&2; return 1
}
W=(--workload intrinsics --adapter topic --conversation-lengths 1024 --output-len 16
   --intrinsic-output-len 2 --warmup 1 --no-progress)
bench() { # label url extra-args...
  local label=$1 url=$2; shift 2
  "$BENCH" run --base-url "$url" "${W[@]}" --concurrency "$C" --num-prompts "$N" --seed 1 \
    --label "$label" --result-json "$OUT/$label.json" "$@" > "$OUT/$label.txt"
  "$BENCH" run --base-url "$url" "${W[@]}" --concurrency 1 --num-prompts 4 --seed 9 \
    --label "$label-idle" --result-json "$OUT/$label-idle.json" "$@" > "$OUT/$label-idle.txt"
}
alora() { # label binary extra-args...
  local label=$1 bin=$2; shift 2
  "$bin" serve --model "$MODEL" --port 8000 --no-demo-adapter --adapter topic="$A/topic" \
    "$@" >"$OUT/$label.log" 2>&1 &
  local pid=$!
  wait_up http://127.0.0.1:8000
  bench "$label" http://127.0.0.1:8000
  curl -sf http://127.0.0.1:8000/metrics | grep '^alora:sliced_prefill' > "$OUT/$label.metrics" || true
  kill $pid; wait $pid 2>/dev/null || true
}

for r in $(seq "$ROUNDS"); do
  alora "old$r" "$OLD" ${OLD_EXTRA[@]+"${OLD_EXTRA[@]}"}
  alora "new$r" "$NEW" ${NEW_EXTRA[@]+"${NEW_EXTRA[@]}"}
  if [ "$r" = 1 ] && [ "${SKIP_LLAMA:-0}" != 1 ]; then
    "$LLAMA_SERVER" -m "$MODEL" -t 2 -np "$C" -c $((C * 4096)) --port 8081 \
      --no-prefill-assistant --lora "$A/topic.gguf" >"$OUT/llama.log" 2>&1 &
    PID=$!
    wait_up http://127.0.0.1:8081
    bench llama http://127.0.0.1:8081 --adapter-field lora
    kill $PID; wait $PID 2>/dev/null || true
  fi
done

# One line per run: the calls' TTFT (median / p90), the base turns' TTFT median and TPOT
# (median / p90), wall time; the idle call's TTFT median beside it.
"$PYTHON" - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys, glob, os
out = sys.argv[1]
print("run | call TTFT median / p90 ms | idle call median ms | p90 / idle | base TTFT median ms | base TPOT median / p90 ms | wall s")
for path in sorted(glob.glob(f"{out}/*.json")):
    name = os.path.basename(path)[:-5]
    if name.endswith("-idle"):
        continue
    d = json.load(open(path))
    k = d["by_kind"]
    call = next(v for n, v in k.items() if n.startswith("intrinsic"))
    idle = json.load(open(f"{out}/{name}-idle.json"))["by_kind"]
    icall = next(v for n, v in idle.items() if n.startswith("intrinsic"))
    c, i, b = call["ttft_ms"], icall["ttft_ms"]["median"], k["base"]
    print(f"{name} | {c['median']:.1f} / {c['p90']:.1f} | {i:.1f} | {c['p90'] / i:.2f}x | "
          f"{b['ttft_ms']['median']:.0f} | {b['tpot_ms']['median']:.1f} / {b['tpot_ms']['p90']:.1f} | "
          f"{d['duration']:.1f}")
PY
