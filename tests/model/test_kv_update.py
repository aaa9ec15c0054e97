"""KV update modes: the DiT's `store_slot` write, and the sampler's clean_pass / last_step / per_step blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ConfigError, load_config
from model.net.dit import AvatarDiT
from model.stream.avatar import AvatarModels, MotionHistory, StreamingAvatar
from model.stream.sampler import KVUpdate
from tests.model.test_pipeline import reference_image, speech_windows


def _dit_and_inputs():
    cfg = load_config(None, {"model.checkpoint": None})
    torch.manual_seed(0)
    dit = AvatarDiT(cfg.model.dit).eval()
    d = cfg.model.dit
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(1, d.in_channels, 1, 8, 8, generator=g)
    text = torch.randn(1, 5, d.text_dim, generator=g)
    audio = torch.randn(1, 4 * d.num_frames_per_block, d.num_audio_layers, d.audio_dim, generator=g)
    block = torch.randn(1, d.in_channels, d.num_frames_per_block, 8, 8, generator=g)
    return dit, ref, text, audio, block


def test_store_slot_writes_what_commit_writes_and_returns_the_same_velocity() -> None:
    dit, ref, text, audio, block = _dit_and_inputs()
    zero = torch.zeros(1)
    with torch.inference_mode():
        committed, stored = dit.new_cache(1, "cpu", torch.float32), dit.new_cache(1, "cpu", torch.float32)
        for cache in (committed, stored):
            dit.prefill(cache, ref, text)
        plain = dit(block, zero, audio, committed, 0)
        dit.commit(committed, block, audio, 0)
        with_store = dit(block, zero, audio, stored, 0, store_slot=True)
    torch.testing.assert_close(with_store, plain)
    torch.testing.assert_close(stored.kv_k, committed.kv_k)
    torch.testing.assert_close(stored.kv_v, committed.kv_v)
    assert stored.slot_frame_start == committed.slot_frame_start and stored.next_slot == committed.next_slot == 1


# ----------------------------------------------------------------------------- the pipeline's modes

SMALL = {"video.size": "64*64", "model.checkpoint": None, "video.infer_frames": 24}  # 2 blocks per clip


@pytest.fixture(scope="module")
def small_models() -> AvatarModels:
    torch.set_num_threads(1)
    return AvatarModels.load(load_config(None, SMALL))


def _count_calls(dit) -> dict:
    counts = {"forward": 0, "commit": 0}
    dit.register_forward_pre_hook(lambda *_: counts.__setitem__("forward", counts["forward"] + 1))
    commit = dit.commit

    def counted(*args, **kwargs):
        counts["commit"] += 1
        return commit(*args, **kwargs)

    dit.commit = counted
    return counts


@pytest.mark.parametrize("mode,rings,commits", [("clean_pass", 1, 2), ("last_step", 1, 0), ("per_step", 4, 0)])
def test_each_mode_makes_its_dit_calls_and_fills_its_windows(small_models, mode, rings, commits):
    cfg = load_config(None, {**SMALL, "sampler.kv_update": mode})
    counts = _count_calls(small_models.dit)
    try:
        avatar = StreamingAvatar(small_models, cfg, seed=1)
        avatar.start(reference_image(), "hello")
        clip = avatar.next_clip(speech_windows(avatar, 1)[0])
    finally:
        del small_models.dit.commit
        small_models.dit._forward_pre_hooks.clear()
    assert counts == {"forward": 2 * 4, "commit": commits}  # 2 blocks x 4 steps (+ a clean pass per block)
    session = avatar._session
    assert len(session.rings) == rings
    assert all(ring.slot_frame_start[:2] == [0, 3] for ring in session.rings)  # both blocks in every window
    assert clip.frames.shape == (24, 64, 64, 3) and clip.frames.dtype == np.uint8


@pytest.mark.parametrize("mode", ["last_step", "per_step"])
def test_new_modes_give_deterministic_clips_that_carry_from_clip_to_clip(small_models, mode):
    cfg = load_config(None, {**SMALL, "sampler.kv_update": mode})

    def render(seed: int) -> np.ndarray:
        avatar = StreamingAvatar(small_models, cfg, seed=seed)
        avatar.start(reference_image(), "hello")
        return np.concatenate([avatar.next_clip(w).frames for w in speech_windows(avatar, 2)])

    first = render(4)
    np.testing.assert_array_equal(render(4), first)
    assert first.shape == (48, 64, 64, 3) and first.std() > 5  # a picture, not a flat field
    assert np.abs(render(5).astype(int) - first).mean() > 1.0


def test_last_step_stays_close_to_the_clean_pass_with_the_trained_bundle():
    """The last step's input is nearly clean (sigma 0.009 at 4 steps): its K/V barely differ from a clean pass."""
    frames = {}
    models = None
    for mode in ("clean_pass", "last_step"):
        cfg = load_config(None, {"sampler.kv_update": mode})
        models = models or AvatarModels.load(cfg)
        avatar = StreamingAvatar(models, cfg, seed=5)
        avatar.start(reference_image(), "A person talking to the camera.")
        frames[mode] = [avatar.next_clip(w).frames.astype(int) for w in speech_windows(avatar, 2)]
    np.testing.assert_array_equal(frames["last_step"][0], frames["clean_pass"][0])  # nothing in the window yet
    assert 0 < np.abs(frames["last_step"][1] - frames["clean_pass"][1]).mean() < 4.0  # measured 1.2


def test_per_step_takes_a_live_step_change_with_one_window_per_new_step(small_models):
    """The page's slider under the reference scheme: the next clip runs the new count, with that many windows
    (opened holding the sink; the old steps' K/V dropped), and going back works the same way."""
    cfg = load_config(None, {**SMALL, "sampler.kv_update": "per_step"})
    avatar = StreamingAvatar(small_models, cfg)
    avatar.start(reference_image(), "hello")
    windows = speech_windows(avatar, 3)
    blocks = avatar.blocks_per_clip
    avatar.next_clip(windows[0])
    assert avatar.denoiser_calls == 4 * blocks and len(avatar._session.rings) == 4
    clip = avatar.next_clip(windows[1], sample_steps=2)
    assert avatar.denoiser_calls == 6 * blocks and len(avatar._session.rings) == 2
    assert clip.frames.shape[0] == 24 and np.isfinite(clip.frames).all()
    ring = avatar._session.rings[0]
    assert ring.filled_slots == min(blocks, ring.num_slots)  # this clip's blocks, none from before the change
    assert avatar.next_clip(windows[2], sample_steps=4).frames.shape[0] == 24
    assert len(avatar._session.rings) == 4


def test_kv_update_is_validated_naming_the_flag():
    with pytest.raises(ConfigError, match="--sampler.kv_update: must be one of"):
        load_config(None, {"sampler.kv_update": "sometimes"})
    with pytest.raises(ConfigError, match="--sampler.kv_update: --parallel.mode tpp .* per_step"):
        load_config(None, {"parallel.mode": "tpp", "sampler.kv_update": "clean_pass"})
    assert load_config(None, {"parallel.mode": "tpp", "sampler.kv_update": "per_step"}).parallel.mode == "tpp"


def test_kv_plan_of_each_mode():
    assert [KVUpdate("per_step", 4).ring(s) for s in range(4)] == [0, 1, 2, 3]
    assert [KVUpdate("last_step", 4).stores(s) for s in range(4)] == [False, False, False, True]
    assert not any(KVUpdate("clean_pass", 4).stores(s) for s in range(4)) and KVUpdate("clean_pass", 4).clean_pass
    assert [KVUpdate(m, 4).motion_lag_blocks for m in ("clean_pass", "last_step", "per_step")] == [0, 0, 3]


def test_motion_history_leaves_out_the_lagging_blocks_and_waits_for_missing_ones():
    start = torch.zeros(1, 1, 19, 1, 1)
    history = MotionHistory(start, lag_blocks=2)
    for index in (1, 0, 3):  # out of order, block 2 not yet clean
        history.add(index, torch.full((1, 1, 3, 1, 1), float(index + 1)))
    assert torch.equal(history.before(2), start)  # blocks 0 and 1 are still within the lag
    motion = history.before(4)  # uses blocks 0, 1
    assert motion.shape == (1, 1, 19, 1, 1) and motion[0, 0, -6:, 0, 0].tolist() == [1, 1, 1, 2, 2, 2]
    with pytest.raises(RuntimeError, match="needs clean block 2"):
        history.before(5)
