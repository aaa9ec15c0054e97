#!/usr/bin/env python3
"""Seconds per clip of each stage of StreamingAvatar, and memory at clip 10 against clip N, on the CPU.

    .venv/bin/python bench/pipeline_cpu.py [--config configs/tiny.yaml] [--clips 100] [--threads 1] [--KEY VALUE ...]

Stages per clip: audio features (wav2vec2), denoising (every DiT call, commits and the motion refresh),
VAE decode. Memory: RSS after returning freed heap pages to the OS (retained) and the process peak.
Extra `--KEY VALUE` pairs are config overrides (`--video.size 64*64 --sample_steps 1`).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import resource
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import load_config
from model.stream.avatar import AvatarModels, StreamingAvatar
from model.stream.windowing import ClipWindower
from run_server import split_overrides


def retained_rss_mib() -> float:
    gc.collect()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args, extra = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, split_overrides(extra))
    avatar = StreamingAvatar(AvatarModels.load(cfg), cfg)
    avatar.start(np.full((*avatar.frame_size, 3), 128, np.uint8), cfg.server.prompt)
    windower = ClipWindower(avatar.clip_samples, avatar.context_samples, avatar.sample_rate_hz)
    rng = np.random.default_rng(0)
    stage_s = {"denoise": [], "decode": []}
    memory = {}
    for clip_number in range(1, args.clips + 1):
        (window,) = windower.push(0.1 * rng.standard_normal(avatar.clip_samples).astype(np.float32))
        t0 = time.perf_counter()
        latents = avatar.denoise_clip(window)
        t1 = time.perf_counter()
        avatar.decode_clip(latents)
        t2 = time.perf_counter()
        stage_s["denoise"].append(t1 - t0)
        stage_s["decode"].append(t2 - t1)
        if clip_number in (10, args.clips):
            memory[clip_number] = (retained_rss_mib(), peak_rss_mib())
    t0 = time.perf_counter()
    for _ in range(10):
        avatar._models.audio_encoder.encode_window(window, avatar.fps, avatar.frames_per_clip)
    audio_s = (time.perf_counter() - t0) / 10
    clip_s = avatar.frames_per_clip / avatar.fps
    med = {k: float(np.median(v[1:])) for k, v in stage_s.items()}
    print(f"config {cfg.model.preset} {cfg.video.size} {avatar.frames_per_clip} frames/clip ({clip_s:.2f} s), "
          f"{cfg.sampler.sample_steps} steps, {args.threads} thread(s), {args.clips} clips")
    print(f"median s/clip: denoise {med['denoise']:.3f} (audio features {audio_s:.3f} of it), "
          f"decode {med['decode']:.3f}, total {med['denoise'] + med['decode']:.3f} "
          f"= {(med['denoise'] + med['decode']) / clip_s:.2f}x real time")
    # clips need not cost the same (a bounded-context VAE decode, model.vae.stream_*, works more on some):
    # the mean is what sets whether a stream keeps up, the slowest clip what the playout delay must cover
    total = np.array(stage_s["denoise"][1:]) + np.array(stage_s["decode"][1:])
    print(f"mean s/clip: decode {np.mean(stage_s['decode'][1:]):.3f}, total {total.mean():.3f} "
          f"= {total.mean() / clip_s:.2f}x real time; slowest clip {total.max():.3f} s")
    for n, (retained, peak) in sorted(memory.items()):
        print(f"clip {n}: retained RSS {retained:.1f} MiB, peak RSS {peak:.1f} MiB")
    print(f"denoiser calls {avatar.denoiser_calls}, cpu load average {psutil.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
