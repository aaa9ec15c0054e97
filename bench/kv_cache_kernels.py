#!/usr/bin/env python3
"""The float8 KV cache's packing and widening at the 14B's shapes: Triton kernels against eager PyTorch.

    python3 bench/kv_cache_kernels.py            # one GPU, ~20 s: bytes equal?, ms per call, GB/s, vs. attention
    TRITON_INTERPRET=1 python3 bench/kv_cache_kernels.py --dry     # CPU rehearsal at small shapes

Per layer and DiT call the per-step scheme packs the call's keys and values (one block: 3,168 tokens at
704x384) and widens the slice attention reads (sink + working slot + window: 15,312 tokens), 40 heads of 128.
Prints `KVKERNELS {json}` rows and a table; the attention row is one SDPA call on the same shapes in bf16.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.net import kv_quant


def _time_ms(fn, device: torch.device, repeat: int) -> float:
    if device.type != "cuda":
        import time

        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - t0) * 1e3 / repeat
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU (with TRITON_INTERPRET=1), small shapes")
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    from model.net import kv_quant_triton as kernels

    device = torch.device("cpu" if args.dry else "cuda")
    heads, d = (4, 32) if args.dry else (40, 128)
    block, slice_tokens = (96, 480) if args.dry else (3168, 15312)
    repeat = 2 if args.dry else args.repeat
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(1, block, heads, d, device=device, generator=g) * 3).to(torch.bfloat16)
    cache = torch.zeros(1, slice_tokens, heads, d + 2, dtype=torch.uint8, device=device)
    for start in range(0, slice_tokens, block):  # a cache full of packed random values
        stop = min(slice_tokens, start + block)
        kv_quant._pack_eager(cache[:, start:stop], torch.randn(1, stop - start, heads, d, device=device,
                                                               generator=g).to(torch.bfloat16))
    eager_dst, fused_dst = torch.zeros_like(cache[:, :block]), torch.zeros_like(cache[:, :block])
    kv_quant._pack_eager(eager_dst, x)
    kernels.pack_into(fused_dst, x)
    pack_equal = torch.equal(eager_dst, fused_dst)
    unpack_equal = torch.equal(kv_quant._unpack_eager(cache, torch.bfloat16), kernels.unpack(cache, torch.bfloat16))
    rows = []
    pack_bytes = x.numel() * 2 + cache[:, :block].numel()
    unpack_bytes = cache.numel() + cache.numel() // (d + 2) * d * 2
    for name, fn, nbytes in (
        ("pack, eager", lambda: kv_quant._pack_eager(eager_dst, x), pack_bytes),
        ("pack, Triton", lambda: kernels.pack_into(fused_dst, x), pack_bytes),
        ("widen, eager", lambda: kv_quant._unpack_eager(cache, torch.bfloat16), unpack_bytes),
        ("widen, Triton", lambda: kernels.unpack(cache, torch.bfloat16), unpack_bytes),
    ):
        ms = _time_ms(fn, device, repeat)
        rows.append({"what": name, "ms": ms, "gb_per_s": nbytes / ms / 1e6, "tokens": block if "pack" in name
                     else slice_tokens})
    keys = kernels.unpack(cache, torch.bfloat16)
    q = x.transpose(1, 2)
    k = v = keys.transpose(1, 2)
    ms = _time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, repeat)
    rows.append({"what": "attention (SDPA, bf16, same shapes)", "ms": ms, "gb_per_s": 0.0, "tokens": slice_tokens})
    info = {"pack_equal": pack_equal, "unpack_equal": unpack_equal, "heads": heads, "head_dim": d,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for row in rows:
        print("KVKERNELS " + json.dumps({**row, **info}), flush=True)
    print(f"packing equal to eager: {pack_equal}; widening equal: {unpack_equal}")
    print("| per layer and call (K or V) | tokens | ms | GB/s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['what']} | {row['tokens']} | {row['ms']:.3f} | {row['gb_per_s']:.0f} |")
    return 0 if pack_equal and unpack_equal else 1


if __name__ == "__main__":
    sys.exit(main())
