#!/usr/bin/env python3
"""Quality of each streaming-scheme option against the `reference` scheme, on a tiny-avatar bundle (CPU).

    .venv/bin/python bench/stream_schemes.py [--base reference|ours] [--bundle model/assets/tiny_avatar.safetensors]
        [--count 2] [--clips 6] [--threads 2] [--only NAME,NAME,...]

Every row runs the same held-out samples (`training/lip_sync_check.py`: speech the bundle never saw, a
face it never saw) through `StreamingAvatar` and scores the frames with `evaluation/metrics.py`: lip sync
(correlation of the measured mouth opening with the truth at lag 0 and the best of -1..1) and identity
(PSNR and SSIM against the reference outside the mouth). The first row is the `--base` scheme (`reference`:
as LiveAvatar runs it), the second the other scheme whole, and each further row flips one part of the base to
the other scheme's value. The preset's fps and size stay as they are (the held-out faces are square, so
`video.sizing` picks the preset's size either way). Prints one markdown row per variant.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import STREAM_SCHEMES, load_config
from model.stream.avatar import AvatarModels, StreamingAvatar
from training.lip_sync_check import heldout_reports

# the scheme's parts as they are flipped (sink distance: both ends together; video.sizing is left out)
PARTS = (("sampler.kv_update",), ("stream.motion",), ("stream.motion_init",), ("stream.motion_rope",),
         ("stream.sink_swap",), ("stream.sink_distance_min", "stream.sink_distance_max"), ("stream.noise",),
         ("stream.decoder_prime",))


def variants(base: str) -> dict[str, dict[str, object]]:
    """Variant name -> config overrides on top of `stream.scheme base`."""
    other = next(name for name in STREAM_SCHEMES if name != base)
    out: dict[str, dict[str, object]] = {base: {}, f"{other} (every part below)": {"stream.scheme": other}}
    for keys in PARTS:
        flipped = {key: STREAM_SCHEMES[other][key] for key in keys}
        out[" ".join(f"{key.split('.')[1]} {value}" for key, value in flipped.items())] = flipped
    out["kv_update last_step"] = {"sampler.kv_update": "last_step"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="reference", choices=tuple(STREAM_SCHEMES))
    p.add_argument("--bundle", default="model/assets/tiny_avatar.safetensors")
    p.add_argument("--count", type=int, default=2, help="held-out samples per variant")
    p.add_argument("--clips", type=int, default=6, help="clips per sample (its first ones)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="comma list of variant names (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = variants(args.base)
    names = list(table) if args.only is None else [n.strip() for n in args.only.split(",")]
    models = None
    print("| variant | lip sync lag 0 | best of -1..1 | identity PSNR dB | SSIM | s |")
    print("|---|---|---|---|---|---|")
    for name in names:
        cfg = load_config(None, {"model.checkpoint": args.bundle, "stream.scheme": args.base, **table[name]})
        models = models or AvatarModels.load(cfg)
        start = time.perf_counter()
        reports = heldout_reports(StreamingAvatar(models, cfg), cfg, args.count, max_clips=args.clips)
        lag0 = np.mean([r.lip_sync.correlation_at_zero for r in reports])
        near = np.mean([max(r.lip_sync.correlation_by_lag[k] for k in (-1, 0, 1)) for r in reports])
        psnr = np.mean([r.identity.psnr_db for r in reports])
        ssim = np.mean([r.identity.ssim for r in reports])
        print(f"| {name} | {lag0:.3f} | {near:.3f} | {psnr:.2f} | {ssim:.3f} | {time.perf_counter() - start:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
