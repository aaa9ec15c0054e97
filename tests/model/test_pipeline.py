"""StreamingAvatar: the model side of the server contract, on the tiny config with random weights."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.config import load_config
from model.io_types import AudioWindow
from model.stream.avatar import AvatarModels, StreamingAvatar, fit_reference_image
from model.stream.scheme import DECODER_PRIME_LATENTS
from model.stream.windowing import ClipWindower
from model.vae.streaming import TIME_STRIDE

SIZE = "64*64"  # smallest frame the DiT's FramePack motion packing accepts; keeps a clip well under a second


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, {"video.size": SIZE, "model.checkpoint": None})  # random weights: mechanics only


@pytest.fixture(scope="module")
def models(cfg) -> AvatarModels:
    torch.set_num_threads(1)
    return AvatarModels.load(cfg)


def reference_image(seed: int = 0) -> np.ndarray:
    """A face-sized blob on a gradient, not square, so start() has to resize and crop."""
    yy, xx = np.mgrid[0:90, 0:120]
    image = np.stack([xx * 2, yy * 2, 255 - xx], axis=-1)
    image[(yy - 45) ** 2 + (xx - 60) ** 2 < 600] = (220, 180, 150)
    return (image + np.random.default_rng(seed).integers(0, 20, image.shape)).clip(0, 255).astype(np.uint8)


def speech_windows(avatar: StreamingAvatar, num_clips: int, seed: int = 0) -> list[AudioWindow]:
    rng = np.random.default_rng(seed)
    t = np.arange(num_clips * avatar.clip_samples) / avatar.sample_rate_hz
    pcm = 0.3 * np.sin(2 * np.pi * 150 * t) * (1 + np.sin(2 * np.pi * 4 * t)) + 0.02 * rng.standard_normal(len(t))
    windower = ClipWindower(avatar.clip_samples, avatar.context_samples, avatar.sample_rate_hz)
    return windower.push(pcm.astype(np.float32), t_s=3.0)


def started(models, cfg, seed: int | None = None) -> StreamingAvatar:
    avatar = StreamingAvatar(models, cfg, seed=seed)
    avatar.start(reference_image(), "A person talking to the camera.")
    return avatar


def test_contract_properties_follow_the_config(models, cfg):
    avatar = StreamingAvatar(models, cfg)
    assert avatar.fps == 16.0 and avatar.frames_per_clip == 12 and avatar.sample_rate_hz == 16000
    assert avatar.clip_samples == 12000  # 12 frames / 16 fps * 16 kHz
    assert avatar.context_samples == 16000  # model.audio_encoder.context_s = 1 s
    assert avatar.frame_size == (64, 64)
    assert avatar.denoiser_calls == 0


def test_each_clip_is_frames_per_clip_uint8_frames_stamped_with_the_window(models, cfg):
    avatar = started(models, cfg)
    for window in speech_windows(avatar, 2):
        clip = avatar.next_clip(window)
        assert clip.frames.shape == (12, 64, 64, 3) and clip.frames.dtype == np.uint8
        assert clip.t0 == window.t0 and clip.clip_index == window.clip_index and clip.fps == 16.0
    assert clip.t0 == pytest.approx(3.75)


def test_sample_steps_sets_the_number_of_denoiser_calls_and_may_change_between_clips(models, cfg):
    """With one KV window for all steps (`clean_pass`, `last_step`; `per_step` fixes the count, test_kv_update.py)."""
    cfg = dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, kv_update="last_step"))
    avatar = started(models, cfg)
    windows = speech_windows(avatar, 3)
    blocks_per_clip = 12 // 4 // cfg.model.dit.num_frames_per_block
    avatar.next_clip(windows[0])  # config default: 4 steps
    assert avatar.denoiser_calls == 4 * blocks_per_clip
    avatar.next_clip(windows[1], sample_steps=1)
    assert avatar.denoiser_calls == 5 * blocks_per_clip
    avatar.next_clip(windows[2], sample_steps=np.int64(2))  # a numpy integer from a JSON/array path is fine
    assert avatar.denoiser_calls == 7 * blocks_per_clip


def test_same_seed_gives_the_same_video_and_another_seed_another(models, cfg):
    def render(seed: int) -> np.ndarray:
        avatar = started(models, cfg, seed=seed)
        return np.concatenate([avatar.next_clip(w).frames for w in speech_windows(avatar, 2)])

    first = render(7)
    np.testing.assert_array_equal(render(7), first)
    assert np.abs(render(8).astype(int) - first).mean() > 1.0


def test_clips_decode_as_one_continuous_video(models, cfg):
    """Frames of clip after clip equal one decode of the whole latent stream: no restart at a clip boundary
    (on one continuous decoder cache, model.vae.stream_context_frames 0; tests/model/test_vae.py covers the
    bounded one)."""
    models.vae.apply_stream(dataclasses.replace(cfg.model.vae, stream_context_frames=0))
    bare = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, detail_restore=False))  # the decode as is
    try:
        avatar = started(models, bare)
    finally:
        models.vae.apply_stream(cfg.model.vae)
    latents, frames = [], []
    for window in speech_windows(avatar, 3):
        latents.append(avatar.denoise_clip(window))
        frames.append(avatar.decode_clip(latents[-1]))
    vae, session = models.vae, avatar._session
    # the decoder's prime (its frames discarded): the image latent, or the still video's first latents
    prime = session.ref_latent if cfg.stream.decoder_prime != "still_video" \
        else session.motion_latents[:, :, :DECODER_PRIME_LATENTS]
    with torch.inference_mode():
        whole = vae.vae.decode(vae.denormalize(torch.cat([prime, *latents], dim=2))).sample
    skip = 1 + TIME_STRIDE * (prime.shape[2] - 1)
    expected = ((whole[0, :, skip:] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    streamed = np.concatenate(frames)
    assert streamed.shape == expected.shape == (36, 64, 64, 3)
    assert np.abs(streamed.astype(int) - expected).max() <= 1


def test_next_clip_depends_on_the_clips_before_it(models, cfg):
    """The DiT cache and motion context are carried: clip 1 changes when clip 0's audio changes."""
    a, b = started(models, cfg), started(models, cfg)
    windows_a, windows_b = speech_windows(a, 2, seed=0), speech_windows(b, 2, seed=1)
    a.denoise_clip(windows_a[0])
    b.denoise_clip(windows_b[0])
    second_a = a.denoise_clip(windows_a[1])
    second_b = b.denoise_clip(AudioWindow(windows_a[1].samples, windows_a[1].new_from, 0.75, 1))
    assert not torch.allclose(second_a, second_b)


def test_reference_is_resized_and_cropped_to_the_frame():
    fitted = fit_reference_image(reference_image(), (64, 128))
    assert fitted.shape == (64, 128, 3) and fitted.dtype == np.uint8
    gray = fit_reference_image(np.full((30, 20), 77, np.uint8), (64, 64))
    assert gray.shape == (64, 64, 3) and np.all(gray == 77)


def test_clip_before_start_and_bad_inputs_are_refused_with_clear_messages(models, cfg):
    avatar = StreamingAvatar(models, cfg)
    window = AudioWindow(np.zeros(28000, np.float32), 16000, 0.0, 0)
    with pytest.raises(RuntimeError, match="start"):
        avatar.next_clip(window)
    avatar.start(reference_image(), "hello")
    with pytest.raises(ValueError, match="12000"):
        avatar.next_clip(AudioWindow(np.zeros(20000, np.float32), 16000, 0.0, 0))
    with pytest.raises(ValueError, match="1..8"):
        avatar.next_clip(window, sample_steps=9)
    with pytest.raises(ValueError, match="uint8"):
        avatar.start(np.zeros((10, 10, 3), np.float32), "hello")


def test_close_frees_the_session_caches(models, cfg):
    avatar = started(models, cfg)
    session = avatar._session
    avatar.next_clip(speech_windows(avatar, 1)[0])
    assert session.dit_cache.nbytes() > 0 and session.decoder.cache_bytes() > 0
    avatar.close()
    assert session.dit_cache.nbytes() == 0 and session.decoder.cache_bytes() == 0
    with pytest.raises(RuntimeError, match="start"):
        avatar.next_clip(speech_windows(avatar, 1)[0])


def test_models_saved_as_a_bundle_load_back_and_render_the_same_clip(models, cfg, tmp_path):
    from model.config import replace_key
    from model.weights.checkpoint import save_bundle

    bundle = save_bundle(tmp_path / "tiny.safetensors", {
        "dit": models.dit, "vae": models.vae.vae, "audio_encoder": models.audio_encoder.model,
        "text_encoder": models.text_encoder.model}, cfg)
    loaded_cfg = replace_key(cfg, "model.checkpoint", str(bundle))
    loaded = AvatarModels.load(replace_key(loaded_cfg, "runtime.seed", cfg.runtime.seed + 1))
    for part in ("dit", "vae", "audio_encoder", "text_encoder"):
        a, b = getattr(models, part), getattr(loaded, part)
        a, b = (a, b) if part == "dit" else (a.vae, b.vae) if part == "vae" else (a.model, b.model)
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), f"{part}.{name}"
    first, again = started(models, cfg, seed=3), started(loaded, loaded_cfg, seed=3)
    window = speech_windows(first, 1)[0]
    # same weights; tensors laid out differently in memory may round a few pixels the other way
    assert np.abs(again.next_clip(window).frames.astype(int) - first.next_clip(window).frames).max() <= 1


def test_missing_checkpoint_names_the_flag(cfg):
    from model.config import replace_key

    with pytest.raises(FileNotFoundError, match="--model.checkpoint"):
        AvatarModels.load(replace_key(cfg, "model.checkpoint", "/nonexistent/tiny.safetensors"))


def test_clip_parts_stream_each_block_and_match_the_whole_clip():
    """Two blocks per clip: two parts of 12 frames, stamped at their own stream time, same frames as next_clip."""
    two_blocks = load_config(None, {"video.size": SIZE, "model.checkpoint": None, "video.infer_frames": 24})
    models = AvatarModels.load(two_blocks)
    whole, parted = started(models, two_blocks, seed=3), started(models, two_blocks, seed=3)
    for window in speech_windows(whole, 2):
        clip = whole.next_clip(window)
        parts = list(parted.clip_parts(window))
        assert [len(p.frames) for p in parts] == [12, 12]
        assert [p.offset for p in parts] == [0, 12] and [p.final for p in parts] == [False, True]
        assert parts[1].t0 == pytest.approx(window.t0 + 12 / 16.0)
        assert all(p.clip_index == window.clip_index for p in parts)
        joined = np.concatenate([p.frames for p in parts])
        assert joined.shape == clip.frames.shape
        assert np.abs(joined.astype(int) - clip.frames.astype(int)).max() <= 1
    assert whole.denoiser_calls == parted.denoiser_calls
