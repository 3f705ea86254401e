#!/usr/bin/env bash
# Shows, without Docker, that the compose file's nginx config keeps a conversation on one
# replica: two alora servers and nginx (Debian package) on loopback, nginx.conf with the
# replica addresses swapped for loopback ports; each conversation's second turn must come
# back from the same replica with cached_tokens > 0.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
if ! command -v nginx >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release --locked -p alora -q
bin="${CARGO_TARGET_DIR:-target}/release/alora"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

ports=(18101 18102)
for p in "${ports[@]}"; do
  "$bin" serve --port "$p" --kv-cache-memory 256MiB --served-model-name smol \
    >"$work/alora-$p.log" 2>&1 &
  pids+=($!)
done
# The compose config, with replicas on loopback and temp paths in the work dir.
python3 - "$work" "${ports[@]}" <<'PY'
import re, sys
work, ports = sys.argv[1], sys.argv[2:]
conf = open("deploy/nginx.conf").read()
replicas = iter(ports)
conf = re.sub(r"server alora-\d+:8000", lambda m: f"server 127.0.0.1:{next(replicas)}", conf)
conf = conf.replace("listen 8080;", "listen 127.0.0.1:18180;")
conf = conf.replace("/tmp/alora-nginx", f"{work}/nginx")
conf = conf.replace("events {", f"error_log {work}/nginx-error.log;\nevents {{", 1)
open(f"{work}/nginx.conf", "w").write(conf)
PY
"$NGINX" -c "$work/nginx.conf" -p "$work" -g "daemon on;"
for p in "${ports[@]}"; do
  for _ in $(seq 1 120); do
    curl -fsS "http://127.0.0.1:$p/health" >/dev/null 2>&1 && break
    sleep 0.5
  done
  if ! curl -fsS "http://127.0.0.1:$p/health" >/dev/null; then
    echo "alora on port $p did not become healthy; its log:" >&2
    cat "$work/alora-$p.log" >&2
    exit 1
  fi
done

python3 - <<'PY'
import json, urllib.request

def chat(session, messages):
    req = urllib.request.Request(
        "http://127.0.0.1:18180/v1/chat/completions",
        data=json.dumps({"messages": messages, "max_tokens": 12, "temperature": 0}).encode(),
        headers={"content-type": "application/json", "X-Session-Id": session})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.headers["X-Alora-Upstream"], json.load(r)

upstreams = set()
for i, session in enumerate(["conv-alpha", "conv-bravo", "conv-charlie", "conv-delta", "conv-echo", "conv-foxtrot"]):
    q = [{"role": "user", "content": f"Question {i}: name a colour and explain why you like it."}]
    up1, r1 = chat(session, q)
    q += [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
          {"role": "user", "content": "Tell me more."}]
    up2, r2 = chat(session, q)
    cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
    print(f"{session}: turn 1 -> {up1}, turn 2 -> {up2}, cached_tokens {cached}")
    assert up1 == up2, f"{session} moved between replicas"
    assert cached > 0, f"{session}: second turn found no cached blocks"
    upstreams.add(up1)
print(f"routing ok; conversations spread over {len(upstreams)} replica(s)")
PY
