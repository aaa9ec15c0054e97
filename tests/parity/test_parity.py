"""Our model against the reference code's own outputs (goldens written by tests/parity/make_goldens.py).

The goldens are LiveAvatar's `CausalWanModel_S2V` (and Wan2.2's audio encoder / Wan2.1 VAE) at a tiny size
in float32 with seeded random weights; which reference path each follows is in make_goldens.py's docstring.
Here the weights go through our loaders (the published file layouts) and our modules are driven call for
call as the reference was: per-step K/V windows (`per_step`), motion tokens at their absolute frames
(motion_rope "absolute"), the reference's sink distance of each call, the sink swapped after clip 0.
`tests/parity/errors.py` prints each comparison's error, and those of the options that leave the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.config import AudioEncoderConfig, DiTConfig, VAEConfig
from model.encoders.audio import AudioEncoder, reference_frame_rows
from model.net.dit import AvatarDiT
from model.stream.avatar import generate_block
from model.stream.sampler import FlowMatchSchedule, KVUpdate
from model.stream.scheme import SinkDistances, clip_noise
from model.vae.streaming import AvatarVAE, build_vae
from model.weights.checkpoint import load_dit
from model.weights.encoders import load_wan_vae, load_wav2vec2

GOLDENS = Path(__file__).resolve().parent / "goldens"
MAX_RELATIVE_ERROR = 1e-4


def _read(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(GOLDENS / name), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


# ----------------------------------------------------------------------------- the DiT


@pytest.fixture(scope="module")
def dit_golden() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return _read("dit.safetensors")


@pytest.fixture(scope="module")
def dit(dit_golden) -> AvatarDiT:
    torch.set_num_threads(1)
    sizes = json.loads(dit_golden[1]["dit"])
    cfg = DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items()})
    return load_dit(cfg, GOLDENS / "dit_checkpoint")  # the published layout, through our loader


class ReferenceDrive:
    """Our DiT called as the reference's TPP loop calls its own: one window per step (`per_step`), the sink
    prefilled on each, frame_start (r * blocks + b) * F, the recorded sink distance of each call; a block
    is our streaming scheme's `generate_block` (the sampler's Euler loop)."""

    def __init__(self, dit: AvatarDiT, golden: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        self.dit, self.g = dit, golden
        self.steps, self.f = int(meta["steps"]), dit.cfg.num_frames_per_block
        self.frames = int(meta["infer_frames"])
        self.schedule = FlowMatchSchedule(self.steps, float(meta["shift"]))
        self.kv = KVUpdate("per_step", self.steps)
        self.rings = [dit.new_cache(1, "cpu", torch.float32, motion_rope="absolute")
                      for _ in range(self.kv.rings)]
        self.blocks = golden["noise"].shape[2] // self.f

    def prefill(self, ref_latent: torch.Tensor) -> None:
        for ring in self.rings:
            self.dit.prefill(ring, ref_latent, self.g["text"][None], self.g["motion_latents"])

    def audio(self, clip: int, block: int) -> torch.Tensor:
        """[1, 4F, layers, dim]: the block's video-frame rows (the reference slices [1, layers, dim, T])."""
        start = clip * self.frames + block * 4 * self.f
        return self.g["audio"][..., start : start + 4 * self.f].permute(0, 3, 1, 2)

    def call(self, x: torch.Tensor, clip: int, block: int, step: int) -> torch.Tensor:
        t = self.schedule.timesteps[step].reshape(1)
        frame_start = (clip * self.blocks + block) * self.f
        distance = int(self.g["sink_distance"][clip, block, step])
        return self.dit(x, t, self.audio(clip, block), self.rings[self.kv.ring(step)], frame_start,
                        store_slot=self.kv.stores(step), sink_distance=distance)

    def block(self, clip: int, block: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The block's clean latents and the velocity of each step (read off the DiT's output)."""
        noise = self.g["noise"][clip][None, :, block * self.f : (block + 1) * self.f]
        distances = tuple(int(d) for d in self.g["sink_distance"][clip, block])
        velocities: list[torch.Tensor] = []
        hook = self.dit.register_forward_hook(lambda module, args, out: velocities.append(out[0].clone()))
        try:
            done = generate_block(self.dit, self.rings, noise, self.audio(clip, block),
                                  (clip * self.blocks + block) * self.f, self.schedule, self.kv, distances)
        finally:
            hook.remove()
        assert done.denoiser_calls == self.steps == len(velocities)
        return done.latents, velocities


@pytest.fixture(scope="module")
def three_clips(dit, dit_golden) -> dict[str, torch.Tensor]:
    """Our whole run of the golden's three clips, driven by our own outputs (the reference's were too)."""
    golden, meta = dit_golden
    drive = ReferenceDrive(dit, golden, meta)
    clips = golden["noise"].shape[0]
    velocities, latents = [], []
    with torch.inference_mode():
        drive.prefill(golden["ref_latent"])
        for clip in range(clips):
            if clip == 1:  # the TPP sink swap: the first latent frame of clip 0's first block
                drive.prefill(latents[0][:, :, 0:1])
            for block in range(drive.blocks):
                x, v = drive.block(clip, block)
                latents.append(x)
                velocities.extend(v)
    shape = golden["velocity"].shape
    return {"velocity": torch.stack(velocities).reshape(shape),
            "latents": torch.cat(latents).reshape(golden["latents"].shape)}


def test_schedule_is_the_reference_schedulers(dit_golden) -> None:
    golden, meta = dit_golden
    schedule = FlowMatchSchedule(int(meta["steps"]), float(meta["shift"]))
    torch.testing.assert_close(schedule.timesteps, golden["timesteps"], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(schedule.sigmas, golden["sigmas"], rtol=1e-6, atol=1e-7)


def test_the_schemes_noise_and_sink_distances_are_the_references_draws(dit_golden) -> None:
    """The `reference` scheme draws what the golden run drew: clip noise from a generator seeded seed + clip,
    sink distances 4..30 from random.Random(seed), one per DiT call in call order."""
    golden, meta = dit_golden
    seed = int(meta["seed"])
    clips, channels, frames, h, w = golden["noise"].shape
    for clip in range(clips):
        noise = clip_noise(seed, clip, (channels, frames, h, w), torch.device("cpu"), torch.float32)
        assert torch.equal(noise[0], golden["noise"][clip])
    draws = SinkDistances(4, 30, seed).draw(golden["sink_distance"].numel())
    assert draws == tuple(golden["sink_distance"].flatten().tolist())


def test_one_dit_call_matches_the_reference(dit, dit_golden) -> None:
    """The first call of the stream (clip 0, block 0, step 0) from the golden's inputs."""
    golden, meta = dit_golden
    drive = ReferenceDrive(dit, golden, meta)
    with torch.inference_mode():
        drive.prefill(golden["ref_latent"])
        v = drive.call(golden["noise"][0][None, :, : drive.f], 0, 0, 0)
    assert relative_error(v[0], golden["velocity"][0, 0, 0]) < MAX_RELATIVE_ERROR


def test_a_whole_clip_matches_the_reference(three_clips, dit_golden) -> None:
    """Clip 0: 4 blocks x 4 steps, each step's own window, the window filling up."""
    golden, _ = dit_golden
    for block in range(golden["latents"].shape[1]):
        for step in range(golden["velocity"].shape[2]):
            err = relative_error(three_clips["velocity"][0, block, step], golden["velocity"][0, block, step])
            assert err < MAX_RELATIVE_ERROR, f"block {block} step {step}: velocity off by {err:.2e}"
        err = relative_error(three_clips["latents"][0, block], golden["latents"][0, block])
        assert err < MAX_RELATIVE_ERROR, f"block {block}: latents off by {err:.2e}"


def test_three_clips_match_the_reference(three_clips, dit_golden) -> None:
    """Clips 1 and 2: the swapped sink, the window rolling over, motion tokens far behind the block."""
    golden, _ = dit_golden
    clips, blocks, steps = golden["velocity"].shape[:3]
    worst = max(
        relative_error(three_clips["velocity"][c, b, s], golden["velocity"][c, b, s])
        for c in range(clips) for b in range(blocks) for s in range(steps)
    )
    assert worst < MAX_RELATIVE_ERROR
    for clip in range(clips):
        err = relative_error(three_clips["latents"][clip], golden["latents"][clip])
        assert err < MAX_RELATIVE_ERROR, f"clip {clip}: latents off by {err:.2e}"


# ----------------------------------------------------------------------------- the audio path


@pytest.fixture(scope="module")
def audio_golden() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return _read("audio.safetensors")


@pytest.fixture(scope="module")
def audio_encoder(audio_golden) -> AudioEncoder:
    sizes = json.loads(audio_golden[1]["wav2vec2"])
    cfg = AudioEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items()})
    encoder = AudioEncoder.build(cfg)
    load_wav2vec2(encoder.model, GOLDENS / "audio_checkpoint", cfg)  # the published wav2vec2 folder
    return encoder


def test_wav2vec2_hidden_states_of_the_whole_file_match_the_reference(audio_encoder, audio_golden) -> None:
    """Every layer's hidden states (50 Hz) of the whole file, normalised as the reference's processor does."""
    golden, _ = audio_golden
    ours = audio_encoder.hidden_states(golden["samples"].numpy()).transpose(0, 1)  # [layers + 1, rows, C]
    assert relative_error(ours, golden["hidden_50hz"]) < MAX_RELATIVE_ERROR


def test_frame_rows_match_the_reference_bucketing_at_25_fps(audio_encoder, audio_golden) -> None:
    """50 -> 30 Hz (align_corners) then the nearest 30 Hz row per 25 fps frame, zeros past the audio."""
    golden, meta = audio_golden
    frames = golden["bucket"].shape[0]
    hidden = audio_encoder.hidden_states(golden["samples"].numpy())
    rows = reference_frame_rows(hidden, float(meta["fps"]), frames)
    assert relative_error(rows, golden["bucket"]) < MAX_RELATIVE_ERROR
    audio_frames = int(len(golden["samples"]) / 16000 * float(meta["fps"]))
    assert torch.count_nonzero(rows[audio_frames + 2 :]) == 0  # past the end: all-zero features


def test_causal_audio_encoder_per_block_matches_the_reference(dit, dit_golden, audio_golden) -> None:
    """Layer mixing + causal convs per 12-frame block: our one-frame prefix vs the reference's 73."""
    golden, meta = audio_golden
    assert json.loads(meta["dit"]) == json.loads(dit_golden[1]["dit"])  # same DiT weights
    f = dit.cfg.num_frames_per_block
    blocks = golden["block_global"].shape[0]
    with torch.inference_mode():
        for block in range(blocks):
            audio = golden["bucket"][block * 4 * f : (block + 1) * 4 * f][None]  # [1, 4F, layers, C]
            glob, local = dit.casual_audio_encoder(audio)
            assert relative_error(glob[0], golden["block_global"][block]) < MAX_RELATIVE_ERROR
            assert relative_error(local[0], golden["block_local"][block]) < MAX_RELATIVE_ERROR


# ----------------------------------------------------------------------------- the VAE


@pytest.fixture(scope="module")
def vae_golden() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return _read("vae.safetensors")


@pytest.fixture(scope="module")
def vae(vae_golden) -> AvatarVAE:
    sizes = json.loads(vae_golden[1]["vae"])
    cfg = VAEConfig(base_dim=sizes["dim"], z_dim=sizes["z_dim"], dim_mult=tuple(sizes["dim_mult"]),
                    num_res_blocks=sizes["num_res_blocks"],
                    temporal_downsample=tuple(sizes["temperal_downsample"]))
    model = build_vae(cfg)
    load_wan_vae(model, GOLDENS / "vae_checkpoint", cfg)  # the published Wan2.1_VAE.pth
    return AvatarVAE(model)


def test_vae_encodes_the_reference_image_and_its_still_video_as_the_reference(vae, vae_golden) -> None:
    """The 1-frame reference latent and the 19 motion latents of the 73-frame still video."""
    golden, _ = vae_golden
    image = golden["image"]
    assert relative_error(vae.encode_reference(image[:, :, 0]), golden["ref_latent"]) < MAX_RELATIVE_ERROR
    still = image.repeat(1, 1, golden["motion_latents"].shape[2] * 4 - 3, 1, 1)  # 73 frames
    assert relative_error(vae.encode_video(still), golden["motion_latents"]) < MAX_RELATIVE_ERROR


def test_stream_decode_primed_with_seven_motion_latents_matches_the_reference(vae, vae_golden) -> None:
    """Decoder primed with motion_latents[:, :, :7] (frames dropped), then block by block; the reference
    keeps each block's 12 frames and drops the first 3 of the stream's first block (applied here)."""
    golden, meta = vae_golden
    decoder = vae.new_decoder(golden["motion_latents"][:, :, : int(meta["prime_latents"])], context_frames=0)
    drop = int(meta["frames_dropped_first_block"])
    video = []
    for block, latents in enumerate(golden["block_latents"]):
        frames = decoder.decode(latents)
        video.append(frames[:, :, drop:] if block == 0 else frames)
    assert relative_error(torch.cat(video, dim=2), golden["video"]) < MAX_RELATIVE_ERROR
