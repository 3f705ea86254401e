#!/usr/bin/env bash
# No-regression A/B over HTTP: an old alora binary and target/release/alora alternating, each
# server fresh; prefill 128 / 512 / 2,048 (1 token out, 3 prompts) and decode 128 in / 64 out
# at concurrency 1 and 8; one result JSON per run in $OUT (BENCHMARKS.md, fifteenth session).
#
#   OLD=/tmp/oldtarget/release/alora OUT=/tmp/ab ROUNDS=4 benches/peers/ab_http.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/ab-http}
OLD=${OLD:?set OLD to the old alora binary}
mkdir -p "$OUT"
BENCH=target/release/alora-bench
for round in $(seq "${ROUNDS:-2}"); do for B in old new; do
  if [ $B = old ]; then BIN=$OLD; else BIN=target/release/alora; fi
  $BIN serve --port 8000 --no-demo-adapter > /tmp/ab-$B.log 2>&1 &
  PID=$!
  for _ in $(seq 200); do curl -sf localhost:8000/health >/dev/null 2>&1 && break; sleep 0.2; done
  for L in 128 512 2048; do
    $BENCH run --workload random --input-len $L --output-len 1 --concurrency 1 --num-prompts 3 --warmup 1 --seed $round$L --no-progress --result-json $OUT/$B-p$L-r$round.json > /dev/null
  done
  $BENCH run --workload random --input-len 128 --output-len 64 --concurrency 1 --num-prompts 2 --warmup 1 --seed ${round}1 --no-progress --result-json $OUT/$B-d1-r$round.json > /dev/null
  $BENCH run --workload random --input-len 128 --output-len 64 --concurrency 8 --num-prompts 16 --warmup 1 --seed ${round}8 --no-progress --result-json $OUT/$B-d8-r$round.json > /dev/null
  kill $PID; wait $PID 2>/dev/null
done; done

# Per workload and binary, each round's figure and their median (prefill: prompt tokens / TTFT,
# median of the prompts; decode: median TPOT, ms) into $OUT/summary.txt.
"${PYTHON:-python3}" - "$OUT" "${ROUNDS:-2}" <<'PY' | tee "$OUT/summary.txt"
import json, statistics as st, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def figure(path, prefill):
    recs = [r for r in json.load(open(path))["records"] if r["ok"]]
    if prefill:
        return st.median([r["prompt_tokens"] / r["ttft"] for r in recs])
    return st.median([(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) * 1e3
                      for r in recs if r["output_tokens"] > 1])
print(f"workload (prefill: tok/s; decode: median TPOT ms) | old rounds 1-{rounds} | new rounds 1-{rounds}")
for w in ["p128", "p512", "p2048", "d1", "d8"]:
    fmt = (lambda x: f"{x:.0f}") if w[0] == "p" else (lambda x: f"{x:.2f}")
    cols = []
    for b in ["old", "new"]:
        v = [figure(f"{out}/{b}-{w}-r{r}.json", w[0] == "p") for r in range(1, rounds + 1)]
        cols.append(" / ".join(map(fmt, v)) + f" (median {fmt(st.median(v))})")
    print(w, "|", " | ".join(cols))
PY
