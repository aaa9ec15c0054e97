#!/usr/bin/env python3
"""Turn the RESULT lines of bench/gpu_bench.py (a .jsonl file or a log) into the BENCHMARKS.md table."""
from __future__ import annotations

import json
import sys

HEADER = ("| label | GPUs | parallel | kv_update | mode | size | frames | steps | layers | clips | DiT s/clip "
          "| VAE s/clip | FPS | TTFF s (first block) | first block s (steady) | latency s (whole clip) | DiT MFU "
          "| peak GB/GPU alloc (clip a -> clip b) |")


def rows_from(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        line = line.removeprefix("RESULT ")
        if line.startswith("{"):
            row = json.loads(line)
            if "dit_s" in row and "fps" in row:  # gpu_bench rows only (dit_speed writes its own lines)
                rows.append(row)
    return rows


def format_row(r: dict) -> str:
    a, b = r["peak_gb_clip"]
    peaks = "; ".join(f"{p[0]:.1f}->{p[1]:.1f}" for p in r["peak_alloc_gb_per_rank"])
    parallel = r.get("parallel", "-")
    if parallel == "ulysses" or (parallel == "-" and r["sp"] > 1):
        parallel = f"Ulysses SP={r['sp']}"
    first = r.get("first_part_s", float("nan"))
    return (f"| {r.get('label', '')} | {r['gpus']} | {parallel} | {r.get('kv_update', 'clean_pass')} | {r['mode']} | "
            f"{r['size']} | {r['frames']} | {r['steps']} | {r['layers']} | {r['clips']} | {r['dit_s']:.3f} | "
            f"{r['vae_s']:.3f} | {r['fps']:.1f} | {r['ttff_s']:.2f} | {first:.2f} | {r['latency_s']:.2f} | "
            f"{100 * r['mfu']:.0f}% | {peaks} (clip {a}->{b}) |")


def main(paths: list[str]) -> int:
    rows = []
    for path in paths:
        with open(path) as fh:
            rows += rows_from(fh.read())
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for r in rows:
        print(format_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
