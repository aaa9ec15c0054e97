"""Online decode keeps memory flat: every cache the same size and RSS unchanged from clip 10 to clip 100."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource

import numpy as np
import psutil
import torch

from model.config import load_config
from model.stream.avatar import AvatarModels, StreamingAvatar
from model.stream.windowing import ClipWindower

NUM_CLIPS = 100
# Keeping each clip's frames (64x64) would add ~13 MiB over 90 clips, its latents ~1 MiB more.
RETAINED_GROWTH_LIMIT_BYTES = 4 * 2**20
PEAK_GROWTH_LIMIT_BYTES = 32 * 2**20  # the allocator settles over the first clips; measured 0-16 MiB


def retained_rss_bytes() -> int:
    """RSS after handing freed heap pages back to the OS, so allocator slack does not read as growth."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def test_memory_is_flat_from_clip_10_to_clip_100():
    torch.set_num_threads(1)
    # 64x64 frames, one step and a narrower VAE (random weights) keep 100 clips to about a minute on one core.
    cfg = load_config(None, {"model.checkpoint": None, "video.size": "64*64", "sample_steps": 1,
                             "model.vae.base_dim": 8})
    avatar = StreamingAvatar(AvatarModels.load(cfg), cfg)
    avatar.start(np.full((64, 64, 3), 128, np.uint8), "A person talking.")
    windower = ClipWindower(avatar.clip_samples, avatar.context_samples, avatar.sample_rate_hz)
    rng = np.random.default_rng(0)
    marks = {}
    for clip_number in range(1, NUM_CLIPS + 1):
        (window,) = windower.push(0.1 * rng.standard_normal(avatar.clip_samples).astype(np.float32))
        assert avatar.next_clip(window).frames.shape[0] == avatar.frames_per_clip
        retained = retained_rss_bytes()
        if clip_number in (10, NUM_CLIPS):
            session = avatar._session
            marks[clip_number] = {"retained": retained, "peak": peak_rss_bytes(), "dit": session.dit_cache.nbytes(),
                                      "vae": session.decoder.cache_bytes(), "motion": tuple(session.motion_latents.shape)}
    at_10, at_100 = marks[10], marks[NUM_CLIPS]
    assert (at_100["dit"], at_100["vae"], at_100["motion"]) == (at_10["dit"], at_10["vae"], at_10["motion"])
    mib = 2**20
    assert at_100["retained"] - at_10["retained"] < RETAINED_GROWTH_LIMIT_BYTES, (
        f"retained RSS grew {(at_100['retained'] - at_10['retained']) / mib:.1f} MiB from clip 10 to {NUM_CLIPS}")
    assert at_100["peak"] - at_10["peak"] < PEAK_GROWTH_LIMIT_BYTES, (
        f"peak RSS grew {(at_100['peak'] - at_10['peak']) / mib:.1f} MiB from clip 10 to {NUM_CLIPS}")
