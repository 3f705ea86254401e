#!/usr/bin/env python3
"""The transformers (PyTorch, f32, CPU) side of BENCHMARKS.md: prefill of 128/512/2048 tokens
and decode at batch 1 and 8 from a 128-token context, on the default model's GGUF
(dequantized to f32 by transformers). Prints medians in tokens/s.

    venv/bin/python benches/peers/torch_bench.py models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2
    # the same with a PEFT adapter applied (the seed's own serving stack), decode only:
    venv/bin/python benches/peers/torch_bench.py MODEL.gguf --adapter demo/topic-adapter --decode-only
"""
import argparse
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("gguf")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--adapter", help="PEFT adapter directory to apply (LoRA or aLoRA)")
ap.add_argument("--decode-only", action="store_true")
ap.add_argument("--prefill-only", action="store_true")
ap.add_argument("--prefill-lengths", default="128,512,2048", help="comma-separated")
a = ap.parse_args()
torch.set_num_threads(a.threads)
d, f = os.path.split(os.path.abspath(a.gguf))
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
if a.adapter:
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, a.adapter).eval()
g = torch.Generator().manual_seed(0)


def ids(b, n):
    return torch.randint(100, 49000, (b, n), generator=g)


def median_time(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


with torch.inference_mode():
    lengths = [int(n) for n in a.prefill_lengths.split(",")]
    for n in () if a.decode_only else lengths:
        x = ids(1, n)
        t = median_time(lambda: model(x, use_cache=False), a.reps if n < 2048 else 3)
        print(f"prefill {n:5d}: {n / t:8.1f} tok/s  ({t * 1000:.0f} ms)")
    for b in () if a.prefill_only else (1, 8):
        x = ids(b, 128)
        new = 32

        def decode():
            out = model(x, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(new):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - t

        decode()
        ts = [decode() for _ in range(3)]
        t = statistics.median(ts)
        print(f"decode batch {b}: {b * new / t:8.1f} tok/s  ({t / new * 1000:.1f} ms/step)")
