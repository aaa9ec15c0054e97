"""The `reference` streaming scheme as a session shows it: what the DiT is given clip after clip (sink,
motion, windows, sink distances, noise), the fps-25 clip and audio rows, frame sizes from the image's
aspect ratio, and config validation naming the flag. Tiny config, random weights: mechanics only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ConfigError, load_config
from model.encoders.audio import frame_feature_positions
from model.io_types import AudioWindow
from model.stream.avatar import AvatarModels, StreamingAvatar, image_to_tensor
from model.stream.scheme import STILL_VIDEO_FRAMES, SinkDistances, clip_noise
from model.stream.sizing import aspect_frame_size, fit_reference_image, fit_short_side_center
from tests.model.test_pipeline import reference_image, speech_windows

REFERENCE = {"video.size": "64*64", "model.checkpoint": None, "stream.scheme": "reference"}
CLIPS = 3


@pytest.fixture(scope="module")
def models() -> AvatarModels:
    torch.set_num_threads(1)
    return AvatarModels.load(load_config(None, REFERENCE))


class DiTRecorder:
    """Records what the session hands the DiT: prefills (sink latent, motion) and each call's inputs."""

    def __init__(self, dit) -> None:
        self.prefills: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.calls: list[dict] = []
        self.commits = 0
        self._dit = dit
        prefill, commit = dit.prefill, dit.commit

        def recorded_prefill(cache, ref_latent, text_context, motion_latents=None):
            self.prefills.append((ref_latent.clone(), motion_latents.clone()))
            return prefill(cache, ref_latent, text_context, motion_latents)

        def recorded_commit(*args, **kwargs):
            self.commits += 1
            return commit(*args, **kwargs)

        def pre_hook(module, args, kwargs):
            self.calls.append({"noisy": args[0].clone(), "frame_start": args[4], "cache": id(args[3]),
                               "sink_distance": kwargs.get("sink_distance"), "store": kwargs.get("store_slot")})

        dit.prefill, dit.commit = recorded_prefill, recorded_commit
        self._hook = dit.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def remove(self) -> None:
        del self._dit.prefill, self._dit.commit
        self._hook.remove()


def run_session(models, overrides: dict | None = None, seed: int = 7, clips: int = CLIPS):
    cfg = load_config(None, {**REFERENCE, **(overrides or {})})
    recorder = DiTRecorder(models.dit)
    try:
        avatar = StreamingAvatar(models, cfg, seed=seed)
        avatar.start(reference_image(), "a person talking")
        after_start = len(recorder.prefills)
        frames = [avatar.next_clip(w).frames for w in speech_windows(avatar, clips)]
    finally:
        recorder.remove()
    return avatar, recorder, after_start, frames


def test_motion_stays_the_still_video_encoding_and_the_sink_swaps_once_after_clip_0(models):
    avatar, rec, after_start, frames = run_session(models)
    session = avatar._session
    # start: every per-step window gets the sink once: the image's latent + its 73-frame still video's latents
    assert after_start == 4
    image = image_to_tensor(fit_reference_image(reference_image(), avatar.frame_size, "aspect"))
    still = models.vae.encode_video(image[:, :, None].expand(-1, -1, STILL_VIDEO_FRAMES, -1, -1))
    assert still.shape[2] == 19
    for ref, motion in rec.prefills[:after_start]:
        torch.testing.assert_close(ref, session.ref_latent)
        torch.testing.assert_close(motion, still)
    # latent 0 of the still video is the image alone: the same as its one-frame latent
    torch.testing.assert_close(still[:, :, :1], session.ref_latent)
    assert not torch.allclose(still[:, :, 1:], session.ref_latent.expand(-1, -1, 18, -1, -1))
    # exactly one re-prefill in the whole stream, after clip 0: the first generated latent frame, static motion
    assert len(rec.prefills) == after_start + 1
    swapped_ref, motion = rec.prefills[-1]
    torch.testing.assert_close(motion, still)
    torch.testing.assert_close(swapped_ref, session.first_frame)
    assert not torch.allclose(swapped_ref, session.ref_latent)
    assert all(torch.equal(ring.kv_v[:, :, : ring.sink_tokens], session.rings[0].kv_v[:, :, : ring.sink_tokens])
               for ring in session.rings)  # the new sink reached every window
    assert not session.motion._pending  # nothing kept for a motion refill that never comes
    assert [f.shape for f in frames] == [(12, 64, 64, 3)] * CLIPS


def test_each_step_reads_and_writes_its_own_window_with_no_clean_pass(models):
    avatar, rec, _, _ = run_session(models, clips=1)
    rings = avatar._session.rings
    assert len(rings) == 4 and rec.commits == 0
    assert len(rec.calls) == 4  # one block of 3 latent frames per 12-frame clip, 4 steps
    assert [c["cache"] for c in rec.calls] == [id(r) for r in rings]  # step s -> window s
    assert all(c["store"] for c in rec.calls)  # every call writes its step's K/V
    assert all(r.slot_frame_start[0] == 0 for r in rings)


def test_sink_distances_are_drawn_per_call_in_4_to_30_and_reproducible_per_seed(models):
    first = run_session(models, seed=7, clips=2)[1].calls
    again = run_session(models, seed=7, clips=2)[1].calls
    other = run_session(models, seed=8, clips=2)[1].calls
    drawn = [c["sink_distance"] for c in first]
    assert len(drawn) == 2 * 4 and all(4 <= d <= 30 for d in drawn)
    assert [c["sink_distance"] for c in again] == drawn
    assert [c["sink_distance"] for c in other] != drawn
    assert len(set(drawn)) > 1
    fixed = run_session(models, {"stream.sink_distance_min": 12, "stream.sink_distance_max": 12}, clips=1)[1]
    assert [c["sink_distance"] for c in fixed.calls] == [12] * 4
    legacy = run_session(models, {"stream.sink_distance_min": 30, "stream.sink_distance_max": 30}, clips=1)[1]
    assert [c["sink_distance"] for c in legacy.calls] == [None] * 4  # the DiT's own +30 rule
    draws = SinkDistances(4, 30, seed=1).draw(10_000)
    assert min(draws) == 4 and max(draws) == 30


def test_each_clip_starts_from_noise_seeded_seed_plus_clip_index(models):
    avatar, rec, _, _ = run_session(models, seed=11, clips=2)
    shape = (16, avatar.latent_frames_per_clip, 8, 8)
    for clip in range(2):
        first_step = rec.calls[clip * 4]
        assert first_step["frame_start"] == clip * 3
        torch.testing.assert_close(first_step["noisy"], clip_noise(11, clip, shape, torch.device("cpu"),
                                                                   torch.float32)[:, :, :3])


def test_fps_25_sets_clip_length_and_two_audio_rows_per_frame():
    cfg = load_config("configs/liveavatar_14b.yaml", {"model.checkpoint": None})
    avatar = StreamingAvatar(None, cfg)
    assert avatar.fps == 25.0 and avatar.frames_per_clip == 48
    assert avatar.clip_samples == 30720  # 48 frames / 25 fps = 1.92 s at 16 kHz
    tiny = StreamingAvatar(None, load_config(None, {"video.fps": 25}))
    assert tiny.clip_samples == 7680  # 12 frames / 25 fps
    rows = frame_feature_positions(1.0, 25.0, 48)
    np.testing.assert_allclose(np.diff(rows), 2.0)  # 50 Hz wav2vec2 rows: 2 per video frame (16 fps: 3.125)
    assert rows[0] == 50.0


def test_a_window_cut_for_16_fps_is_refused_at_25(models):
    avatar, *_ = run_session(models, {"video.fps": 25}, clips=1)
    assert avatar.clip_samples == 7680
    wrong = AudioWindow(np.zeros(avatar.context_samples + 12000, np.float32), avatar.context_samples, 0.0, 0)
    with pytest.raises(ValueError, match="needs exactly 7680"):
        avatar.next_clip(wrong)


@pytest.mark.parametrize("image_hw,frame_hw", [((1080, 1920), (384, 704)), ((1920, 1080), (704, 384)),
                                               ((1000, 1000), (512, 512)), ((400, 720), (384, 704))])
def test_frame_size_follows_the_aspect_ratio_under_the_704x384_area(image_hw, frame_hw):
    assert aspect_frame_size(image_hw, 704 * 384) == frame_hw
    cfg = load_config("configs/liveavatar_14b.yaml", {"model.checkpoint": None})
    assert StreamingAvatar(None, cfg).frame_size_for(image_hw) == frame_hw
    crop = load_config("configs/liveavatar_14b.yaml", {"model.checkpoint": None, "video.sizing": "crop"})
    assert StreamingAvatar(None, crop).frame_size_for(image_hw) == (384, 704)


def test_reference_fit_scales_the_short_side_and_pads_a_wider_frame_with_black():
    image = np.full((90, 160, 3), 200, np.uint8)  # 16:9 -> short side 384 gives 682 wide, the frame is 704
    fitted = fit_short_side_center(image, (384, 704))
    assert fitted.shape == (384, 704, 3)
    assert (fitted[:, :11] == 0).all() and (fitted[:, -11:] == 0).all() and (fitted[:, 11:-11] == 200).all()
    tall = fit_short_side_center(np.full((300, 100, 3), 50, np.uint8), (128, 64))
    assert tall.shape == (128, 64, 3) and (tall == 50).all()


def test_a_portrait_session_runs_at_its_own_frame_size(models):
    cfg = load_config(None, {**REFERENCE, "video.size": "192*128"})
    avatar = StreamingAvatar(models, cfg, seed=1)
    assert avatar.frame_size == (128, 192)  # before start: an image shaped like video.size
    portrait = np.random.default_rng(0).integers(0, 255, (300, 160, 3), dtype=np.uint8)
    avatar.start(portrait, "hello")
    assert avatar.frame_size == (192, 128)
    clip = avatar.next_clip(speech_windows(avatar, 1)[0])
    assert clip.frames.shape == (12, 192, 128, 3)
    avatar.start(np.zeros((100, 100, 3), np.uint8), "hello")
    assert avatar.frame_size == (128, 128)


def test_still_video_encode_is_the_vaes_causal_encode(models):
    video = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    raw = models.vae.vae._encode(video)[:, :16]  # diffusers: first frame alone, then 4 frames per call
    torch.testing.assert_close(models.vae.encode_video(video), models.vae.normalize(raw))


def test_decoder_primed_with_seven_still_video_latents_continues_that_stream(models):
    g = torch.Generator().manual_seed(0)
    prime = torch.randn(1, 16, 7, 8, 8, generator=g)
    clip = torch.randn(1, 16, 3, 8, 8, generator=g)
    streamed = models.vae.new_decoder(prime, context_frames=0).decode(clip)
    whole = models.vae.new_decoder(prime[:, :, :1], context_frames=0).decode(torch.cat([prime[:, :, 1:], clip], 2))
    torch.testing.assert_close(streamed, whole[:, :, -12:])


@pytest.mark.parametrize("overrides,flag", [
    ({"stream.scheme": "faithful"}, "--stream.scheme: must be one of"),
    ({"stream.motion": "moving"}, "--stream.motion: must be one of"),
    ({"stream.motion_init": "zeros"}, "--stream.motion_init: must be one of"),
    ({"stream.motion_rope": "relative"}, "--stream.motion_rope: must be one of"),
    ({"stream.noise": "per_step"}, "--stream.noise: must be one of"),
    ({"stream.decoder_prime": "none"}, "--stream.decoder_prime: must be one of"),
    ({"video.sizing": "stretch"}, "--video.sizing: must be one of"),
    ({"stream.sink_distance_min": 0}, "--stream.sink_distance_min: must be in 1..30"),
    ({"stream.sink_distance_min": 20, "stream.sink_distance_max": 10}, "--stream.sink_distance_max: must be in"),
    ({"stream.sink_distance_max": 31}, "--stream.sink_distance_max: must be in"),
    ({"stream.sink_swap": "sometimes"}, "--stream.sink_swap: expected true or false"),
])
def test_stream_keys_are_validated_naming_the_flag(overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        load_config(None, overrides)


def test_a_scheme_sets_its_parts_and_a_given_key_wins():
    from model.config import STREAM_SCHEMES, replace_key

    reference = load_config("configs/liveavatar_14b.yaml", {"model.checkpoint": None})
    assert reference.stream.scheme == "reference" and reference.sampler.kv_update == "per_step"
    assert reference.video.sizing == "aspect" and reference.video.fps == 25.0
    mixed = load_config(None, {"stream.scheme": "reference", "sampler.kv_update": "last_step"})
    assert mixed.sampler.kv_update == "last_step" and mixed.stream.motion == "static"
    ours = replace_key(reference, "stream.scheme", "ours")
    for dotted, value in STREAM_SCHEMES["ours"].items():
        section, key = dotted.split(".")
        assert getattr(getattr(ours, section), key) == value, dotted
