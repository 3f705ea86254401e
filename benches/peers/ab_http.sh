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
