"""Float8 modes on the trained tiny avatar (CPU): frames against float32 and lip sync, per mode.

    .venv/bin/python bench/fp8_quality.py --samples 4 --clips 4

For each held-out sample the same speech and face go through `StreamingAvatar` once per `runtime.fp8` mode;
prints the mean absolute difference to the float32 frames (grey levels, 0-255) and the lip-sync correlation at
lag 0 (`training.lip_sync_check.score_video`). `tensor` is LiveAvatar's per-tensor `--fp8`, `gemm` the
per-row/per-token quantiser; both run `torch._scaled_mm` on the CPU (no fast accumulation there).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import load_config
from model.stream.avatar import AvatarModels, StreamingAvatar
from training.lip_sync_check import cut_sample, generate_frames, score_video
from training.talking_dataset import make_sample

MODES = ("none", "weights", "gemm", "tensor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4, help="held-out samples 0..N-1")
    parser.add_argument("--clips", type=int, default=4, help="clips per sample")
    args = parser.parse_args()
    avatars = {}
    for mode in MODES:
        cfg = load_config(None, {"runtime.fp8": mode})
        avatars[mode] = (cfg, StreamingAvatar(AvatarModels.load(cfg), cfg))
    print("| sample | mode | mean abs diff vs float32 (0-255) | p99 abs diff | lip sync lag 0 |")
    print("|---|---|---|---|---|")
    diffs: dict[str, list[float]] = {m: [] for m in MODES}
    syncs: dict[str, list[float]] = {m: [] for m in MODES}
    for index in range(args.samples):
        base = None
        for mode in MODES:
            cfg, avatar = avatars[mode]
            sample = cut_sample(make_sample("heldout", index, cfg.video.width, cfg.video.fps,
                                            cfg.audio_sample_rate_hz), args.clips * cfg.video.infer_frames)
            frames = generate_frames(avatar, sample.reference, sample.audio).astype(np.float64)
            sync = score_video(frames.astype(np.uint8), sample.opening, sample.mouth_box,
                               sample.reference).lip_sync.correlation_at_zero
            base = frames if mode == "none" else base
            diff = np.abs(frames - base)
            diffs[mode].append(float(diff.mean()))
            syncs[mode].append(sync)
            print(f"| heldout {index} | {mode} | {diff.mean():.2f} | {np.percentile(diff, 99):.0f} | {sync:.3f} |",
                  flush=True)
    for mode in MODES:
        print(f"| mean | {mode} | {np.mean(diffs[mode]):.2f} | | {np.mean(syncs[mode]):.3f} |")


if __name__ == "__main__":
    main()
