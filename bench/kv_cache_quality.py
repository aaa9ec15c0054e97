#!/usr/bin/env python3
"""The float8 KV cache on the trained tiny avatar (CPU): frames against the float32 cache, and lip sync.

    .venv/bin/python bench/kv_cache_quality.py --samples 4 --clips 4

For each held-out sample the same speech and face go through `StreamingAvatar` (the preset's streaming scheme,
per-step KV windows) with the KV cache in float32 (the reference), in float8 (`runtime.kv_cache_dtype float8`),
and, for scale, with the whole model in bf16 (cache in bf16 too). Prints the mean and 99th-percentile absolute
difference to the float32-cache frames (grey levels, 0-255) and the lip-sync correlation at lag 0
(`training.lip_sync_check.score_video`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import load_config
from model.net.attention import set_attention_backend
from model.stream.avatar import AvatarModels, StreamingAvatar
from training.lip_sync_check import cut_sample, generate_frames, score_video
from training.talking_dataset import make_sample

SETTINGS = {
    "float32 cache": {},
    "float8 cache": {"runtime.kv_cache_dtype": "float8"},
    "bf16 model and cache": {"runtime.dtype": "bfloat16"},
}
FP8_ATTENTION = "float8 cache + fp8 attention (emulated)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4, help="held-out samples 0..N-1")
    parser.add_argument("--clips", type=int, default=4, help="clips per sample")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="override for every setting, e.g. --set sampler.kv_update per_step")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {list(SETTINGS)}")
    parser.add_argument("--fp8_attention", action="store_true",
                        help="add the float8 cache read by the float8 attention kernel, emulated in PyTorch")
    args = parser.parse_args()
    if args.fp8_attention:  # the kernel needs a GPU; its arithmetic runs here as attention_fp8.reference
        from model.net.attention import emulate_fp8_attention

        SETTINGS[FP8_ATTENTION] = {"runtime.kv_cache_dtype": "float8", "runtime.attention_backend": "fp8"}
        args.settings += f",{FP8_ATTENTION}"
        emulate_fp8_attention(True)
    avatars = {}
    for name in args.settings.split(","):
        cfg = load_config(None, {**dict(args.set), **SETTINGS[name]})
        avatars[name] = (cfg, StreamingAvatar(AvatarModels.load(cfg), cfg))
    print(f"kv_update {cfg.sampler.kv_update}, {cfg.video.infer_frames} frames per clip, {args.clips} clips")
    print("| sample | KV cache | mean abs diff vs float32 cache (0-255) | p99 abs diff | lip sync lag 0 |")
    print("|---|---|---|---|---|")
    diffs: dict[str, list[float]] = {m: [] for m in avatars}
    syncs: dict[str, list[float]] = {m: [] for m in avatars}
    for index in range(args.samples):
        base = None
        for name, (cfg, avatar) in avatars.items():
            set_attention_backend(cfg.runtime.attention_backend)  # one global, set by each load: this setting's
            sample = cut_sample(make_sample("heldout", index, cfg.video.width, cfg.video.fps,
                                            cfg.audio_sample_rate_hz), args.clips * cfg.video.infer_frames)
            frames = generate_frames(avatar, sample.reference, sample.audio)
            sync = score_video(frames, sample.opening, sample.mouth_box, sample.reference).lip_sync.correlation_at_zero
            base = frames.astype(np.float64) if base is None else base
            diff = np.abs(frames.astype(np.float64) - base)
            diffs[name].append(float(diff.mean()))
            syncs[name].append(sync)
            print(f"| heldout {index} | {name} | {diff.mean():.2f} | {np.percentile(diff, 99):.0f} | {sync:.3f} |",
                  flush=True)
    for name in avatars:
        print(f"| mean | {name} | {np.mean(diffs[name]):.2f} | | {np.mean(syncs[name]):.3f} |")


if __name__ == "__main__":
    main()
