#!/usr/bin/env bash
# The aLoRA race (issue #17, item 5): N conversations live at once, each round a base turn
# then one call per intrinsic adapter, closed loop at a concurrency; alora with the adapters
# as aLoRA and as plain LoRA, then llama-server with the same aLoRAs as GGUF. Same model file,
# threads, machine and conversations (same seed) for every server.
#
#   LLAMA_SERVER=/path/to/llama-server PYTHON=/venv/with/gguf/bin/python benches/peers/race.sh [OUT_DIR]
#
# ALORA / ALORA_ARGS pick the alora binary and extra `serve` flags (e.g. --close-turns); LABEL
# names its result files (default alora); SKIP_LORA=1 leaves out the LoRA race (minutes),
# SKIP_LLAMA=1 the llama-server runs (for an A/B of two alora builds beside one peer run).
#
# Adapters: `topic` is the demo aLoRA (invocation `<|im_start|>topic\n`); `certainty` is its
# shape with other weights (B negated) and the invocation `<|im_start|>certainty\n` (speed does
# not depend on what the weights say). `*_lora` are both as plain LoRAs (no invocation).
# PYTHON needs `gguf`, `numpy` and `safetensors` (benches/peers/peft_to_gguf.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/race-bench}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
LLAMA_SERVER=${LLAMA_SERVER:-}
if [ "${SKIP_LLAMA:-0}" != 1 ] && [ -z "$LLAMA_SERVER" ]; then
  echo "set LLAMA_SERVER to a llama-server binary (or SKIP_LLAMA=1)" >&2; exit 2
fi
PYTHON=${PYTHON:-python3}
ALORA=${ALORA:-target/release/alora}
BENCH=${BENCH:-target/release/alora-bench}
N=${N:-8} C=${C:-4} ROUNDS=${ROUNDS:-3} LEN=${LEN:-1000}
KV=${KV:-auto}   # alora's --kv-cache-dtype
LABEL=${LABEL:-alora}
read -r -a EXTRA <<<"${ALORA_ARGS:-}"
mkdir -p "$OUT"

# The adapters, as PEFT directories for alora and GGUF files for llama-server.
A="$OUT/adapters"
rm -rf "$A" && mkdir -p "$A"
cp -r demo/topic-alora "$A/topic"
cp -r demo/topic-alora "$A/certainty"
"$PYTHON" - "$A" <<'PY'
import json, sys
from pathlib import Path
a = Path(sys.argv[1])
def edit(name, inv):
    p = a / name / "adapter_config.json"
    c = json.loads(p.read_text())
    if inv is None:
        c.pop("alora_invocation_tokens", None)
    else:
        c["alora_invocation_tokens"] = inv
    p.write_text(json.dumps(c, indent=2))
edit("certainty", [1, 33622, 198])   # <|im_start|> certainty \n
# Other weights (B negated): a distinct adapter, so no KV is shared between the two as LoRAs.
from safetensors.numpy import load_file, save_file
w = a / "certainty" / "adapter_model.safetensors"
t = load_file(str(w))
save_file({k: (-v if ".lora_B." in k else v) for k, v in t.items()}, str(w))
PY
for n in topic certainty; do
  cp -r "$A/$n" "$A/${n}_lora"
  "$PYTHON" -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); c.pop('alora_invocation_tokens'); json.dump(c, open(p,'w'), indent=2)" "$A/${n}_lora/adapter_config.json"
  "$PYTHON" benches/peers/peft_to_gguf.py "$A/$n" "$A/$n.gguf" --heads 9 --kv-heads 3
done

wait_up() {
  for _ in $(seq 600); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "server at $1 did not come up" >&2; return 1
}

run() { # label url adapters workload extra-args...
  local label=$1 url=$2 adapters=$3 kind=$4; shift 4
  "$BENCH" run --base-url "$url" --workload "$kind" --adapter "$adapters" \
    --conversation-lengths "$LEN" --output-len 32 --intrinsic-output-len 4 --warmup 1 \
    --no-progress --label "$label" --result-json "$OUT/$label.json" "$@" | tee "$OUT/$label.txt"
}
idle() { run "$1-idle" "$2" "$3" intrinsics --turns 1 --concurrency 1 --num-prompts 5 --seed 11 "${@:4}"; }
race() { run "$1" "$2" "$3" race --turns "$ROUNDS" --concurrency "$C" --num-prompts "$N" --seed 7 "${@:4}"; }

"$ALORA" serve --model "$MODEL" --port 8000 --no-demo-adapter --kv-cache-dtype "$KV" \
  --adapter topic="$A/topic" --adapter certainty="$A/certainty" \
  --adapter topic_lora="$A/topic_lora" --adapter certainty_lora="$A/certainty_lora" \
  ${EXTRA[@]+"${EXTRA[@]}"} >"$OUT/$LABEL.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:8000
idle "$LABEL" http://127.0.0.1:8000 topic,certainty
curl -sf -X POST http://127.0.0.1:8000/reset_prefix_cache >/dev/null
race "$LABEL-alora" http://127.0.0.1:8000 topic,certainty
if [ "${SKIP_LORA:-0}" != 1 ]; then
  curl -sf -X POST http://127.0.0.1:8000/reset_prefix_cache >/dev/null
  race "$LABEL-lora" http://127.0.0.1:8000 topic_lora,certainty_lora
fi
kill $PID; wait $PID 2>/dev/null || true

if [ "${SKIP_LLAMA:-0}" = 1 ]; then exit 0; fi
"$LLAMA_SERVER" -m "$MODEL" -t 2 -np "$C" -c $((C * 4096)) --port 8081 \
  --no-prefill-assistant --lora "$A/topic.gguf" --lora "$A/certainty.gguf" >"$OUT/llama.log" 2>&1 &
PID=$!
wait_up http://127.0.0.1:8081
idle llama http://127.0.0.1:8081 topic,certainty --adapter-field lora
race llama-alora http://127.0.0.1:8081 topic,certainty --adapter-field lora
kill $PID; wait $PID 2>/dev/null || true

"$BENCH" compare "$OUT/$LABEL-alora.json" "$OUT/llama-alora.json" \
  $([ -f "$OUT/$LABEL-lora.json" ] && echo "$OUT/$LABEL-lora.json") \
  --plot-dir "$OUT/plots" | tee "$OUT/compare.txt"
