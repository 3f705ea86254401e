#!/usr/bin/env bash
# An intrinsic call on a conversation already served, at ~1,000 / ~1,900 / ~3,700 tokens, idle
# (one conversation at a time): alora with f32 K/V (the default), with f16 K/V, the same
# adapter as a plain LoRA (each K/V dtype, at ~1,900), and llama-server with the same aLoRA as GGUF (issue #17's
# acceptance table). Each conversation: a base turn (32 tokens out: its TPOT is the decode step
# at that context), then one `topic` call (4 tokens out). Same model file, threads, machine and
# conversations (same seed) for every server.
#
#   LLAMA_SERVER=/path/to/llama-server PYTHON=/venv/with/gguf/bin/python benches/peers/intrinsic_lengths.sh [OUT_DIR]
#
# ALORA_ARGS: extra `alora serve` flags (e.g. --no-close-turns); BENCH_ARGS: extra alora-bench
# flags for every server (e.g. --think-time-ms 200, a pause before each call); SKIP_F16=1 and
# SKIP_LLAMA=1 leave out the f16 and llama-server runs (for an A/B of alora settings beside one
# peer run); LABEL prefixes alora's result files (default alora).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/intrinsic-lengths}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
LLAMA_SERVER=${LLAMA_SERVER:-}
if [ "${SKIP_LLAMA:-0}" != 1 ] && [ -z "$LLAMA_SERVER" ]; then
  echo "set LLAMA_SERVER to a llama-server binary (or SKIP_LLAMA=1)" >&2; exit 2
fi
LABEL=${LABEL:-alora}
PYTHON=${PYTHON:-python3}
ALORA=${ALORA:-target/release/alora}
BENCH=${BENCH:-target/release/alora-bench}
N=${N:-12}
read -r -a EXTRA <<<"${ALORA_ARGS:-}"
read -r -a BARGS <<<"${BENCH_ARGS:-}"
ALL="--num-prompts $N --conversation-lengths 1000,1900,3700"
mkdir -p "$OUT"
A="$OUT/adapters"
rm -rf "$A" && mkdir -p "$A"
cp -r demo/topic-alora "$A/topic"
cp -r demo/topic-alora "$A/topic_lora"
"$PYTHON" -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); c.pop('alora_invocation_tokens'); json.dump(c, open(p,'w'), indent=2)" "$A/topic_lora/adapter_config.json"
"$PYTHON" benches/peers/peft_to_gguf.py "$A/topic" "$A/topic.gguf" --heads 9 --kv-heads 3

wait_up() {
  for _ in $(seq 600); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "server at $1 did not come up" >&2; return 1
}
run() { # label url adapter extra...
  local label=$1 url=$2 adapter=$3; shift 3
  "$BENCH" run --base-url "$url" --workload intrinsics --adapter "$adapter" \
    --turns 1 --output-len 32 --intrinsic-output-len 4 \
    --concurrency 1 --seed 21 --warmup 1 --no-progress \
    --label "$label" --result-json "$OUT/$label.json" ${BARGS[@]+"${BARGS[@]}"} "$@" \
    | tee "$OUT/$label.txt"
}
alora() { # label kv-dtype
  "$ALORA" serve --model "$MODEL" --port 8000 --no-demo-adapter --kv-cache-dtype "$2" \
    --adapter topic="$A/topic" --adapter topic_lora="$A/topic_lora" ${EXTRA[@]+"${EXTRA[@]}"} \
    >"$OUT/$1.log" 2>&1 &
  PID=$!
  wait_up http://127.0.0.1:8000
  run "$1" http://127.0.0.1:8000 topic $ALL
  curl -sf -X POST http://127.0.0.1:8000/reset_prefix_cache >/dev/null
  run "$1-lora" http://127.0.0.1:8000 topic_lora --num-prompts 3 --conversation-lengths 1900
  kill $PID; wait $PID 2>/dev/null || true
}
trap 'kill $PID 2>/dev/null || true' EXIT
alora "$LABEL-f32" f32
[ "${SKIP_F16:-0}" = 1 ] || alora "$LABEL-f16" f16
if [ "${SKIP_LLAMA:-0}" != 1 ]; then
"$LLAMA_SERVER" -m "$MODEL" -t 2 -np 1 -c 8192 --port 8081 --no-prefill-assistant \
  --lora "$A/topic.gguf" >"$OUT/llama.log" 2>&1 &
PID=$!
wait_up http://127.0.0.1:8081
run llama http://127.0.0.1:8081 topic --adapter-field lora $ALL
kill $PID; wait $PID 2>/dev/null || true
fi

# Per length: median intrinsic TTFT, median TPOT of the base turns (the decode step there).
"$PYTHON" - "$OUT" "$LABEL" <<'PY'
import json, statistics as st, sys
out, label = sys.argv[1], sys.argv[2]
def load(name):
    return json.load(open(f"{out}/{name}.json"))["records"]
rows = {}
names = [f"{label}-f32", f"{label}-f16", "llama"]
for name in names + [f"{label}-f32-lora", f"{label}-f16-lora"]:
    try:
        recs = load(name)
    except FileNotFoundError:
        continue
    for L in sorted({r["length"] for r in recs}):
        calls = [r["ttft"] * 1e3 for r in recs if r["ok"] and r["kind"] == "intrinsic" and r["length"] == L]
        base = [(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) * 1e3 for r in recs
                if r["ok"] and r["kind"] == "base" and r["length"] == L and r["output_tokens"] > 1]
        ptok = [r["prompt_tokens"] for r in recs if r["kind"] == "intrinsic" and r["length"] == L]
        # rows the call computed: its prompt less what the server reported cached
        new = [r["prompt_tokens"] - (r["cached_tokens"] or 0) for r in recs
               if r["ok"] and r["kind"] == "intrinsic" and r["length"] == L]
        rows.setdefault(L, {})[name] = (st.median(calls) if calls else float("nan"),
                                        st.median(base) if base else float("nan"),
                                        st.median(ptok) if ptok else 0,
                                        st.median(new) if new else float("nan"))
print(f"{'length':>7} {'prompt':>7} {'rows':>5} | " + " | ".join(f"{n:>26}" for n in ["alora-f32 TTFT/TPOT", "alora-f16 TTFT/TPOT", "llama TTFT/TPOT", "LoRA TTFT f32", "LoRA TTFT f16"]))
for L, r in sorted(rows.items()):
    cells = []
    for n in names:
        t = r.get(n)
        cells.append(f"{t[0]:9.1f} / {t[1]:6.2f} ({t[0]/t[1]:4.2f}x)" if t else " " * 26)
    for kv, n in (("f32", names[0]), ("f16", names[1])):
        lora, call = r.get(f"{label}-{kv}-lora"), r.get(n)
        cells.append(f"{lora[0]:9.1f} ({lora[0]/call[0]:5.1f}x)" if lora and call else "")
    p = next(iter(r.values()))[2]
    new = r.get(names[0], (0, 0, 0, float("nan")))[3]
    print(f"{L:>7} {p:>7.0f} {new:>5.0f} | " + " | ".join(f"{c:>26}" for c in cells))
PY
