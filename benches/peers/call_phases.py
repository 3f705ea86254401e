#!/usr/bin/env python3
"""Where an aLoRA call's time goes over HTTP (BENCHMARKS.md, seventeenth session).

Against a running alora (`alora serve --no-demo-adapter --adapter topic=demo/topic-alora`):
per conversation, a base turn of ~1,900 prompt tokens (32 tokens out, `ignore_eos`, special
tokens' text kept so the conversation round-trips), a pause, then one streamed call of the
`topic` aLoRA. Around each call it reads the server's phase histograms (their sums' deltas are
that one call's phases) beside the client's time to first content. Prints medians in ms.
Standard library only. Use fresh conversations (a new --seed, or POST /reset_prefix_cache)
for each run: a call already cached computes one row.

    python3 benches/peers/call_phases.py [--url http://127.0.0.1:8000] [--n 6] [--pause 0.2]
"""
import argparse
import json
import random
import statistics
import time
import urllib.request

PHASES = {
    "vllm:time_to_first_token_seconds_sum": "server TTFT",
    "alora:request_preprocess_seconds_sum": "preprocess",
    "vllm:request_queue_time_seconds_sum": "queue",
    "vllm:request_prefill_time_seconds_sum": "admission to first token",
}


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    return urllib.request.urlopen(req)


def phases(url):
    out = {}
    for line in urllib.request.urlopen(url + "/metrics").read().decode().splitlines():
        name, _, value = line.partition(" ")
        if name in PHASES:
            out[PHASES[name]] = float(value)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--pause", type=float, default=0.2, help="seconds between turn and call")
    ap.add_argument("--adapter", default="topic")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    words = ("the of and to in is was for on that with as by at from his her it an are "
             "were which this be or").split()
    rows = []
    for _ in range(a.n):
        msgs = [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(1500))}]
        v = json.load(post(a.url + "/v1/chat/completions", {
            "messages": msgs, "max_tokens": 32, "temperature": 0, "ignore_eos": True,
            "skip_special_tokens": False}))
        msgs.append({"role": "assistant", "content": v["choices"][0]["message"]["content"]})
        time.sleep(a.pause)
        before = phases(a.url)
        t0 = time.perf_counter()
        ttft = None
        with post(a.url + "/v1/chat/completions", {
                "messages": msgs, "max_tokens": 4, "temperature": 0, "adapter": a.adapter,
                "stream": True}) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                c = json.loads(line[5:]).get("choices") or [{}]
                if ttft is None and c[0].get("delta", {}).get("content"):
                    ttft = time.perf_counter() - t0
        after = phases(a.url)
        row = {k: (after[k] - before[k]) * 1e3 for k in before}
        row["client TTFT"] = ttft * 1e3
        rows.append(row)
    for k in rows[0]:
        print(f"{k:>26}: {statistics.median(r[k] for r in rows):7.1f} ms  "
              f"{[round(r[k], 1) for r in rows]}")


if __name__ == "__main__":
    main()
