"""video.detail_restore: the model's motion shown on the sharp reference (model/stream/detail.py), as a unit on
made-up frames and through the trained tiny avatar on a face and a photograph it never saw."""
from __future__ import annotations

import pytest
import torch

from model.config import ConfigError, load_config
from model.stream.detail import DetailRestore

H = W = 16
FPS = 16.0
BUNDLE = "model/assets/tiny_avatar.safetensors"
VOICES = ("espeak:en-gb-x-gbclan+Denis", "espeak:en-us+Mario")  # held out from training; CI has espeak-ng


def still(value: float) -> torch.Tensor:
    return torch.full((1, 3, H, W), value)


def video_of(frames: list[torch.Tensor]) -> torch.Tensor:
    """[1, 3, H, W] frames -> a decoded video [1, 3, T, H, W]."""
    return torch.stack([f[0] for f in frames], dim=1)[None]


def test_a_still_blurred_drawing_shows_the_reference_itself():
    reference = torch.rand(1, 3, H, W) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(reference, 5, stride=1, padding=2)
    restore = DetailRestore(reference, FPS, settle_s=8.0, rise_s=0.125)
    out = restore.apply(video_of([blurred] * 6))
    assert torch.allclose(out, video_of([reference] * 6).clamp(-1, 1), atol=1e-6)


def test_a_darkening_mouth_is_added_to_the_reference_and_goes_when_it_closes():
    reference = still(0.2)
    drawn = still(-0.1)  # the model's own (wrong) colour of the face
    restore = DetailRestore(reference, FPS, settle_s=8.0, rise_s=0.125)
    restore.apply(video_of([drawn] * 4))  # the baseline settles on the closed mouth
    opened = drawn.clone()
    opened[:, :, 6:10, 5:11] -= 0.6  # the mouth opens: darker there only
    out = restore.apply(video_of([opened]))[0, :, 0]
    assert torch.allclose(out[:, 6:10, 5:11], torch.full((3, 4, 6), 0.2 - 0.6), atol=1e-5)
    outside = torch.ones(H, W, dtype=torch.bool)
    outside[6:10, 5:11] = False
    assert torch.allclose(out[:, outside], torch.full_like(out[:, outside], 0.2), atol=1e-6)
    closed = restore.apply(video_of([drawn] * int(FPS)))  # a second of closed mouth: the reference again
    assert (closed[0, :, -1] - reference[0]).abs().max() < 0.01


def test_a_steady_error_of_the_model_sinks_into_the_baseline():
    reference = still(0.0)
    restore = DetailRestore(reference, FPS, settle_s=1.0, rise_s=0.125)
    restore.apply(video_of([still(0.0)] * 2))
    blob = still(0.0)
    blob[:, :, 2:6, 2:6] = -0.8  # a dark blob the model keeps drawing from now on
    shown = restore.apply(video_of([blob] * int(5 * FPS)))
    first, last = shown[0, :, 0, 2:6, 2:6], shown[0, :, -1, 2:6, 2:6]
    assert first.mean() < -0.7  # new: shown as motion
    assert last.abs().max() < 0.01  # five settle times later: gone


def test_steady_exposure_shows_no_frame_wide_flash_and_keeps_the_mouth():
    """A decoder-swap flash (the whole frame a little brighter for two frames, every 36 frames) lifts a plain
    upper-envelope baseline for good, darkening what the viewer sees; with steady exposure it shows nothing and
    the baseline stays, while a mouth opening is shown as before."""
    reference, drawn = still(0.2), still(-0.1)
    frames = []
    for k in range(4 * 36):
        frame = drawn.clone()
        if k % 36 in (1, 2):
            frame += 0.15  # the flash
        frames.append(frame)
    opened = drawn.clone()
    opened[:, :, 6:10, 5:11] -= 0.6
    frames.append(opened)
    plain = DetailRestore(reference, FPS, settle_s=16.0, rise_s=0.125).apply(video_of(frames))
    steady = DetailRestore(reference, FPS, settle_s=16.0, rise_s=0.125, steady_exposure=True).apply(video_of(frames))
    before_mouth = slice(0, 4 * 36)
    assert (plain[0, :, before_mouth] - 0.2).min() < -0.1  # the plain baseline kept the flashes: a darker face
    assert torch.allclose(steady[0, :, before_mouth], torch.full_like(steady[0, :, before_mouth], 0.2), atol=1e-5)
    assert torch.allclose(steady[0, :, -1, 6:10, 5:11], torch.full((3, 4, 6), 0.2 - 0.6), atol=1e-5)
    assert torch.allclose(steady[0, :, -1, :2], torch.full((3, 2, W), 0.2), atol=1e-5)


@pytest.mark.parametrize("steady_exposure", [False, True])
def test_state_carries_over_calls_so_any_split_gives_the_same_frames(steady_exposure):
    torch.manual_seed(0)
    reference = torch.rand(1, 3, H, W) * 2 - 1
    frames = [torch.rand(1, 3, H, W) * 2 - 1 for _ in range(12)]
    whole = DetailRestore(reference, FPS, 8.0, 0.125, steady_exposure)
    split = DetailRestore(reference, FPS, 8.0, 0.125, steady_exposure)
    a = whole.apply(video_of(frames))
    b = torch.cat([split.apply(video_of(frames[:1])), split.apply(video_of(frames[1:5])),
                   split.apply(video_of(frames[5:]))], dim=2)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("key, value", [("video.detail_settle_s", 0), ("video.detail_rise_s", -1)])
def test_bad_settings_are_refused_naming_the_flag(key, value):
    with pytest.raises(ConfigError, match=f"--{key}"):
        load_config(None, {key: value})


def test_presets_default_it_on_for_tiny_and_off_for_the_reference_14b():
    assert load_config(None).video.detail_restore is True
    assert load_config("configs/liveavatar_14b.yaml").video.detail_restore is False


def test_trained_avatar_keeps_an_unseen_face_sharp_and_its_mouth_moving():
    """A held-out face and voice over 3 s: outside the mouth the viewer sees the reference (>= 26 dB; the bare decode
    reads ~22 dB), and the mouth still follows the voice."""
    from training.long_stream import evaluate_bundle

    report, frames = evaluate_bundle(BUNDLE, "face", 3.0, window_s=3.0, threads=1, voices=VOICES)
    assert frames.shape == (48, 128, 128, 3)
    assert report.psnr_by_window_db[0] >= 26.0, report.summary()
    assert report.lip_sync_best_near_zero is not None and report.lip_sync_best_near_zero >= 0.7, report.summary()
