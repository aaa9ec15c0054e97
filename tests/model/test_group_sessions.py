"""A 2-process group on the CPU (gloo, Ulysses SP=2) makes the same clips as one process, tiny config."""
from __future__ import annotations

import numpy as np
import torch

from model import parallel
from model.config import load_config
from model.io_types import AudioWindow
from tests.model.group_runner import run_in_group

CLIPS = 2


def _inputs(avatar) -> tuple[np.ndarray, list[AudioWindow]]:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(96, 80, 3), dtype=np.uint8)
    windows = []
    for i in range(CLIPS):
        samples = (0.1 * rng.standard_normal(avatar.context_samples + avatar.clip_samples)).astype(np.float32)
        windows.append(AudioWindow(samples, avatar.context_samples, t0=i * avatar.clip_samples / 16000, clip_index=i))
    return image, windows


def _group_worker() -> dict:
    from model.group_sessions import GroupAvatar, follow, new_avatar, release_followers
    from model.pipeline import AvatarModels

    cfg = load_config(None)
    group = parallel.start_group("cpu", cfg.model.dit.num_heads)
    try:
        models = AvatarModels.load(cfg)
        if group.rank != 0:
            return {"followed_clips": follow(models, cfg)}
        avatar = new_avatar(models, cfg, seed=7)
        image, windows = _inputs(avatar)
        avatar.start(image, "a person talking")
        frames = [avatar.next_clip(w).frames for w in windows]
        calls = avatar.denoiser_calls
        avatar.close()
        release_followers()
        return {"frames": frames, "grouped": isinstance(avatar, GroupAvatar), "calls": calls}
    finally:
        group.shutdown()


def test_two_rank_group_makes_the_clips_of_one_process() -> None:
    from model.pipeline import AvatarModels, StreamingAvatar

    torch.set_num_threads(1)
    cfg = load_config(None)
    avatar = StreamingAvatar(AvatarModels.load(cfg), cfg, seed=7)
    image, windows = _inputs(avatar)
    avatar.start(image, "a person talking")
    expected = [avatar.next_clip(w).frames for w in windows]

    leader, follower = run_in_group(_group_worker, 2)

    assert leader["grouped"] and follower["followed_clips"] == CLIPS
    assert leader["calls"] == avatar.denoiser_calls
    for got, want in zip(leader["frames"], expected):
        assert got.shape == want.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.01  # float32 sums in another order: at most a rounding step
