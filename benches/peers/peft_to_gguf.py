#!/usr/bin/env python3
"""A PEFT LoRA / aLoRA directory as a llama.cpp adapter GGUF, for llama-server's `--lora`.

    python3 benches/peers/peft_to_gguf.py ADAPTER_DIR OUT.gguf --heads 9 --kv-heads 3
        [--invocation-tokens 1,18879,198]

What llama.cpp's convert_lora_to_gguf.py writes, without torch or the base model's HF
directory (only `gguf` and `numpy`): `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, an aLoRA's `adapter.alora.invocation_tokens` (from adapter_config.json or
--invocation-tokens), and `blk.N.<tensor>.weight.lora_a` / `.lora_b` in f32. llama.cpp stores a
llama model's Q and K rows permuted (per head, the two rotary halves interleaved), so the q/k
`lora_b` rows are permuted the same way. Llama-architecture targets only (q/k/v/o, gate/up/down).
"""
import argparse
import json
import struct
import sys
from pathlib import Path

import gguf
import numpy as np

TARGETS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}


def read_safetensors(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[8 + n + a : 8 + n + b]
        if info["dtype"] == "BF16":
            u = np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16
            t = u.view(np.float32)
        else:
            t = np.frombuffer(buf, dtype=DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"]).astype(np.float32)
    return out


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute for Q/K rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("adapter_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--heads", type=int, required=True, help="attention heads of the base")
    ap.add_argument("--kv-heads", type=int, required=True, help="KV heads of the base")
    ap.add_argument("--invocation-tokens", help="comma-separated ids (default: the config's)")
    a = ap.parse_args()

    cfg = json.loads((a.adapter_dir / "adapter_config.json").read_text())
    if cfg.get("use_dora") or cfg.get("use_rslora"):
        sys.exit("DoRA / rsLoRA adapters are not handled")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        sys.exit("per-module rank or alpha patterns are not handled")
    inv = cfg.get("alora_invocation_tokens")
    if a.invocation_tokens:
        inv = [int(t) for t in a.invocation_tokens.split(",")]
    tensors = read_safetensors(a.adapter_dir / "adapter_model.safetensors")

    w = gguf.GGUFWriter(str(a.out), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(cfg["lora_alpha"]))
    if inv:
        w.add_key_value(
            "adapter.alora.invocation_tokens",
            [int(t) for t in inv],
            gguf.GGUFValueType.ARRAY,
            gguf.GGUFValueType.UINT32,
        )
    n = 0
    for name in sorted(tensors):
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        A, B = tensors[name], tensors[b_name]
        parts = name.split(".")
        layer = int(parts[parts.index("layers") + 1])
        module = next((k for k in TARGETS if f".{k}." in name), None)
        if module is None:
            sys.exit(f"{name}: not a llama projection this script knows")
        if module == "self_attn.q_proj":
            B = permute_rows(B, a.heads)
        elif module == "self_attn.k_proj":
            B = permute_rows(B, a.kv_heads)
        base = f"blk.{layer}.{TARGETS[module]}.weight"
        w.add_tensor(base + ".lora_a", np.ascontiguousarray(A))
        w.add_tensor(base + ".lora_b", np.ascontiguousarray(B))
        n += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{a.out}: {n} LoRA pairs, alpha {cfg['lora_alpha']}, invocation {inv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
