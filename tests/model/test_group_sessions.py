"""A 2-process group on the CPU (gloo, Ulysses SP=2) serves the same clips as one process, tiny config.

Rank 0 drives the server's own `ModelEngine` (which opens a `GroupAvatar` through `new_avatar`), rank 1
runs `follow()`; the frames must match a single `StreamingAvatar` up to float rounding.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from model.config import load_config
from model.parallel import group as parallel
from tests.model.group_runner import random_session_inputs, run_in_group

CLIPS = 2
PROMPT = "a person talking"




async def _serve_clips(cfg) -> list[np.ndarray]:
    from server.engine import ModelEngine

    engine = ModelEngine(cfg)
    await engine.load()
    fmt = engine.stream_format
    image, windows = random_session_inputs(fmt.context_samples, fmt.clip_samples, CLIPS)
    await engine.start("s", image, PROMPT)
    frames = [(await engine.submit("s", w)).frames for w in windows]
    await engine.close()
    return frames


def _group_worker(overrides: dict) -> dict:
    from model.parallel.followers import follow, release_followers
    from model.stream.avatar import AvatarModels

    cfg = load_config(None, overrides)
    group = parallel.start_group("cpu", cfg.model.dit.num_heads)
    try:
        if group.rank != 0:
            return {"followed_clips": follow(AvatarModels.load(cfg), cfg)}
        try:
            return {"frames": asyncio.run(_serve_clips(cfg))}
        finally:
            release_followers()
    finally:
        group.shutdown()


@pytest.mark.parametrize("overrides", [{}, {"parallel.shard_weights": True}], ids=["whole", "sharded_weights"])
def test_two_rank_group_serves_the_clips_of_one_process(overrides: dict) -> None:
    # sharded: each rank loads half of every block's rows of the trained bundle and gathers them per layer
    from model.stream.avatar import AvatarModels, StreamingAvatar

    torch.set_num_threads(1)
    cfg = load_config(None)
    avatar = StreamingAvatar(AvatarModels.load(cfg), cfg, seed=cfg.runtime.seed)
    image, windows = random_session_inputs(avatar.context_samples, avatar.clip_samples, CLIPS)
    avatar.start(image, PROMPT)
    expected = [avatar.next_clip(w).frames for w in windows]

    leader, follower = run_in_group(_group_worker, 2, overrides)

    assert follower["followed_clips"] == CLIPS
    assert len(leader["frames"]) == CLIPS
    for got, want in zip(leader["frames"], expected):
        assert got.shape == want.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.01  # float32 sums in another order: at most a rounding step


def test_one_process_gets_a_plain_streaming_avatar() -> None:
    from model.parallel.followers import new_avatar
    from model.stream.avatar import StreamingAvatar

    cfg = load_config(None)
    parallel.set_current(parallel.ParallelGroup(parallel.GroupLayout(1, 0, 1, None), torch.device("cpu"), None))
    assert type(new_avatar(object(), cfg, seed=1)) is StreamingAvatar
