"""Timestep-forcing pipeline parallelism (`parallel.mode tpp`): 2 gloo ranks give the frames of one process
running kv_update per_step, under either streaming scheme (the reference one's drawn sink distances, sink
swap and static motion ride along), and the step count is tied to the group size with clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import load_config
from model.parallel import group as parallel
from model.parallel.group import LaunchError, plan_layout
from tests.model.group_runner import random_session_inputs, run_in_group

# random weights, 2 blocks per clip (the motion context skips the block still in flight), 2 steps
SETTINGS = {"video.size": "64*64", "model.checkpoint": None, "video.infer_frames": 24, "sampler.sample_steps": 2,
            "sampler.kv_update": "per_step"}
CLIPS = 3




def _tpp_worker(scheme: str) -> dict:
    from model.parallel.followers import follow, new_avatar, release_followers
    from model.stream.avatar import AvatarModels

    cfg = load_config(None, {**SETTINGS, "stream.scheme": scheme, "parallel.mode": "tpp"})
    group = parallel.start_group_from_config(cfg)
    try:
        models = AvatarModels.load(cfg)
        if group.rank != 0:
            return {"blocks": follow(models, cfg, group)}
        try:
            avatar = new_avatar(models, cfg, seed=cfg.runtime.seed)
            image, windows = random_session_inputs(avatar.context_samples, avatar.clip_samples, CLIPS)
            avatar.start(image, "a person talking")
            refused = ""
            try:
                avatar.next_clip(windows[0], sample_steps=3)
            except ValueError as exc:
                refused = str(exc)
            frames = [avatar.next_clip(windows[0], sample_steps=2).frames,
                      np.concatenate([p.frames for p in avatar.clip_parts(windows[1])]),
                      avatar.next_clip(windows[2]).frames]
            avatar.close()
            return {"frames": frames, "type": type(avatar).__name__, "refused": refused,
                    "calls": avatar.denoiser_calls}
        finally:
            release_followers(group)
    finally:
        group.shutdown()


@pytest.mark.parametrize("scheme", ["ours", "reference"])
def test_two_rank_tpp_gives_the_frames_of_per_step_on_one_process(scheme: str) -> None:
    from model.stream.avatar import AvatarModels, StreamingAvatar

    torch.set_num_threads(1)
    cfg = load_config(None, {**SETTINGS, "stream.scheme": scheme})
    avatar = StreamingAvatar(AvatarModels.load(cfg), cfg, seed=cfg.runtime.seed)
    image, windows = random_session_inputs(avatar.context_samples, avatar.clip_samples, CLIPS)
    avatar.start(image, "a person talking")
    expected = [avatar.next_clip(w).frames for w in windows]

    leader, follower = run_in_group(_tpp_worker, 2, scheme)

    assert leader["type"] == "TppAvatar"
    assert follower["blocks"] == CLIPS * 2  # rank 1 ran step 1 of every block
    assert leader["calls"] == CLIPS * 2 * 2
    assert "fixed at 2 (--sampler.sample_steps)" in leader["refused"] and "tpp" in leader["refused"]
    for got, want in zip(leader["frames"], expected):
        assert got.shape == want.shape == (24, 64, 64, 3)
        np.testing.assert_array_equal(got, want)


def test_tpp_step_count_must_equal_the_group_size_naming_the_flag() -> None:
    cfg = load_config(None, {**SETTINGS, "parallel.mode": "tpp", "sampler.sample_steps": 4})
    parallel.check_step_pipeline(cfg, 4)
    with pytest.raises(LaunchError, match=r"--sampler.sample_steps 4 needs torchrun --nproc-per-node 4 \(launched 2\)"):
        parallel.check_step_pipeline(cfg, 2)


def test_tpp_layout_gives_each_rank_a_step_and_whole_sequences() -> None:
    layout = plan_layout(world_size=4, rank=2, num_heads=40, vae_rank=False, mode="tpp")
    assert (layout.pp_size, layout.pp_rank, layout.sp_size, layout.sp_rank, layout.role) == (4, 2, 1, 0, "dit")
    assert plan_layout(3, 0, 40, False, mode="tpp").pp_size == 3  # heads need not split: no Ulysses
    with pytest.raises(LaunchError, match="--parallel.vae_rank false"):
        plan_layout(world_size=2, rank=0, num_heads=4, vae_rank=True, mode="tpp")
