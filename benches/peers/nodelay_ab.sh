#!/usr/bin/env bash
# A/B of two alora binaries on the idle intrinsic call (one conversation at a time, ~1,000 and
# ~1,900 tokens, 4 each, the demo `topic` aLoRA), alternating twice: OLD (e.g. a build before
# TCP_NODELAY) against NEW. Prints each call's TTFT, the base turns' TPOT, and how many calls
# got their first tokens in one burst (the first inter-token gap under 1 ms).
#
#   OLD=/tmp/alora-old [NEW=target/release/alora] [PYTHON=python3] benches/peers/nodelay_ab.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
O=${1:-/tmp/nodelay-ab}
OLD=${OLD:?set OLD to the alora binary to compare against}
NEW=${NEW:-target/release/alora}
BENCH=${BENCH:-target/release/alora-bench}
PYTHON=${PYTHON:-python3}
rm -rf "$O"; mkdir -p "$O"
for r in 1 2; do for B in old new; do
  if [ $B = old ]; then BIN=$OLD; else BIN=$NEW; fi
  "$BIN" serve --no-demo-adapter --adapter topic=demo/topic-alora --port 8000 >"$O/$B$r.log" 2>&1 &
  P=$!
  for _ in $(seq 600); do curl -sf localhost:8000/health >/dev/null 2>&1 && break; sleep 0.5; done
  "$BENCH" run --base-url http://127.0.0.1:8000 --workload intrinsics --adapter topic \
    --turns 1 --output-len 32 --intrinsic-output-len 4 --concurrency 1 --seed 21 --warmup 1 --no-progress \
    --num-prompts 8 --conversation-lengths 1000,1900 --label $B$r --result-json "$O/$B$r.json" >"$O/$B$r.txt"
  kill $P; wait $P 2>/dev/null || true
done; done
"$PYTHON" - "$O" <<'PY'
import json, statistics as st, sys
for n in ["old1", "new1", "old2", "new2"]:
    r = json.load(open(f"{sys.argv[1]}/{n}.json"))["records"]
    for L in (1000, 1900):
        c = [x for x in r if x["kind"] == "intrinsic" and x["length"] == L and x["ok"]]
        b = [x for x in r if x["kind"] == "base" and x["length"] == L and x["ok"]]
        tpot = st.median([(x["e2e"] - x["ttft"]) / (x["output_tokens"] - 1) * 1e3 for x in b])
        t = [x["ttft"] * 1e3 for x in c]
        burst = sum(1 for x in c if x["itl"] and x["itl"][0] < 1e-3)
        print(f"{n} {L}: call TTFT median {st.median(t):.1f} ms (each {[round(v) for v in t]}), "
              f"TPOT {tpot:.2f} ms, first tokens in one burst {burst}/{len(c)}")
PY
