#!/usr/bin/env bash
# Trains the demo intrinsic for SmolLM2-135M-Instruct: an aLoRA that labels the topic of the
# last answer in a conversation (sports, food, weather, science), from the data in demo/topic
# (made by `cargo run -p alora-trainer --example make_topic_data -- demo/topic`). Writes the
# adapter to $OUT (default demo/topic-adapter; the committed demo/topic-alora was made with
# OUT=demo/topic-alora) and prints held-out accuracy next to the majority baseline.
# Extra arguments go to `alora train`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
cargo run --release -p alora -- train \
  --data demo/topic/train.jsonl --val demo/topic/val.jsonl \
  --invocation $'<|im_start|>topic\n' \
  --rank 8 --alpha 32 --targets q_proj,k_proj,v_proj \
  --lr 5e-4 --epochs 1 --eval-steps 25 \
  --out "${OUT:-demo/topic-adapter}" --test demo/topic/test.jsonl "$@"
