#!/usr/bin/env python3
"""Quality of each streaming-scheme option against the `reference` scheme, on a tiny-avatar bundle (CPU).

    .venv/bin/python bench/stream_schemes.py [--bundle model/assets/tiny_avatar.safetensors] [--count 2]
        [--clips 6] [--threads 2] [--only reference,ours,...]

Every row runs the same held-out samples (`training/lip_sync_check.py`: speech the bundle never saw, a
face it never saw) through `StreamingAvatar` and scores the frames with `evaluation/metrics.py`: lip sync
(correlation of the measured mouth opening with the truth at lag 0 and the best of -1..1) and identity
(PSNR and SSIM against the reference outside the mouth). `reference` is the scheme as LiveAvatar runs it;
each other row flips one part to this project's earlier choice (`ours` flips them all). The preset's fps
and size stay as they are (the held-out faces are square, so `video.sizing` picks the preset's size either
way). Prints one markdown row per variant.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import load_config
from model.stream.avatar import AvatarModels, StreamingAvatar
from training.lip_sync_check import heldout_reports

# variant name -> config overrides on top of `stream.scheme reference`
VARIANTS: dict[str, dict[str, object]] = {
    "reference": {},
    "ours (every part below)": {"stream.scheme": "ours"},
    "kv_update clean_pass": {"sampler.kv_update": "clean_pass"},
    "kv_update last_step": {"sampler.kv_update": "last_step"},
    "motion generated (refilled)": {"stream.motion": "generated"},
    "motion_init copies": {"stream.motion_init": "copies"},
    "motion_rope follow": {"stream.motion_rope": "follow"},
    "sink_swap false": {"stream.sink_swap": False},
    "sink distance fixed 30": {"stream.sink_distance_min": 30, "stream.sink_distance_max": 30},
    "noise per_block": {"stream.noise": "per_block"},
    "decoder_prime reference": {"stream.decoder_prime": "reference"},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="model/assets/tiny_avatar.safetensors")
    p.add_argument("--count", type=int, default=2, help="held-out samples per variant")
    p.add_argument("--clips", type=int, default=6, help="clips per sample (its first ones)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="comma list of variant names (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(VARIANTS) if args.only is None else [n.strip() for n in args.only.split(",")]
    models = None
    print("| variant | lip sync lag 0 | best of -1..1 | identity PSNR dB | SSIM | s |")
    print("|---|---|---|---|---|---|")
    for name in names:
        cfg = load_config(None, {"model.checkpoint": args.bundle, "stream.scheme": "reference", **VARIANTS[name]})
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
