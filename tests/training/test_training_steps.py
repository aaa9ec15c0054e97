"""The training pieces on a 64x64 stream: the VAE's latent-scale fold is exact, the DiT step trains every part."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Model

from model.config import load_config
from model.encoders.audio import wav2vec2_config
from model.encoders.text import TextEncoder
from model.net.dit import AvatarDiT
from model.vae.streaming import AvatarVAE, build_vae
from training.dit_training import DiTBatch, dit_loss, encode_streams
from training.lip_sync_check import heldout_samples, save_heldout_bank
from training.self_forcing import plan_rollout, rollout_loss
from training.speech import make_utterance
from training.stream_pool import build_pool
from training.talking_dataset import split_identities
from training.train_tiny import geometry_of, learning_rate
from training.vae_training import decode_latents, encode_moments, fit_latent_scale, to_video_tensor, vae_batch


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = load_config(None, {"video.size": "64*64"})
    geometry = geometry_of(cfg)
    streams = build_pool([make_utterance(3)], split_identities("train"), 2, geometry, seed=0)
    return cfg, geometry, streams


def test_latent_scale_fold_keeps_reconstruction_and_unit_scale(setup):
    cfg, _geometry, streams = setup
    vae = build_vae(cfg.model.vae)
    video = to_video_tensor(vae_batch(streams, 2, 4, np.random.default_rng(1))[0], "cpu")
    with torch.no_grad():
        before = vae(video).sample
    fit_latent_scale(vae, streams, "cpu", num_videos=8, num_frames=4)
    with torch.no_grad():
        after = vae(video).sample
        raw = vae._encode(to_video_tensor(vae_batch(streams, 8, 4, np.random.default_rng(0))[0], "cpu"))[:, :16]
    assert torch.allclose(before, after, atol=1e-4)
    normalized = AvatarVAE(vae).normalize(raw)
    assert normalized.mean().abs() < 0.05
    assert torch.allclose(normalized.std(dim=(0, 2, 3, 4)), torch.ones(16), atol=0.05)


def test_dit_step_reaches_sink_audio_and_block_weights(setup):
    cfg, geometry, streams = setup
    dit = AvatarDiT(cfg.model.dit)
    wav2vec2 = Wav2Vec2Model(wav2vec2_config(cfg.model.audio_encoder)).eval()
    text = TextEncoder.build(cfg.model.text_encoder).encode("a face")
    latent_streams = encode_streams(AvatarVAE(build_vae(cfg.model.vae)), streams, geometry, "cpu")
    assert latent_streams[0].latents.shape[1] == latent_streams[0].num_clips * 3
    batch = DiTBatch(clip_index=min(2, latent_streams[0].num_clips - 1), streams=latent_streams[:1] * 2)
    loss, stats = dit_loss(dit, wav2vec2, text, batch, geometry, sample_steps=4, shift=3.0,
                           rng=np.random.default_rng(0), noise_draws=1)
    loss.backward()
    assert np.isfinite(stats["loss"])
    for name, module in [("frame_packer", dit.frame_packer), ("audio injector", dit.audio_injector),
                         ("patch embedding", dit.patch_embedding), ("wav2vec2", wav2vec2.feature_extractor)]:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reaches the {name}"


def test_rollout_step_under_the_reference_scheme_trains_every_part(setup):
    """One self-forcing step: the batch rolls out 2 clips on its own per-step windows (sink swapped after clip 0,
    static still-video motion); the loss reaches the sink's layers, the audio path and wav2vec2."""
    cfg, geometry, streams = setup
    torch.manual_seed(3)
    dit = AvatarDiT(cfg.model.dit)
    wav2vec2 = Wav2Vec2Model(wav2vec2_config(cfg.model.audio_encoder)).eval()
    text = TextEncoder.build(cfg.model.text_encoder).encode("a face")
    latent_streams = encode_streams(AvatarVAE(build_vae(cfg.model.vae)), streams, geometry, "cpu")
    assert latent_streams[0].motion.shape[1] == 19  # the 73-frame still video's latents
    rng = np.random.default_rng(0)
    plan = plan_rollout(latent_streams, 2, max_clips=2, min_clips=2, block_frames=3, teacher=False, rng=rng)
    loss, stats = rollout_loss(dit, wav2vec2, text, plan, geometry, sample_steps=2, shift=3.0, rng=rng)
    loss.backward()
    assert np.isfinite(float(stats["loss"])) and len(stats["clip_errors"]) == 2
    for name, module in [("frame_packer", dit.frame_packer), ("audio injector", dit.audio_injector),
                         ("patch embedding", dit.patch_embedding), ("wav2vec2", wav2vec2.feature_extractor)]:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reaches the {name}"


def test_two_call_vae_matches_the_per_frame_loops_and_the_streaming_decoder(setup):
    cfg, _geometry, streams = setup
    torch.manual_seed(1)
    vae = build_vae(cfg.model.vae)
    video = to_video_tensor(vae_batch(streams, 2, 8, np.random.default_rng(2))[0], "cpu")
    with torch.no_grad():
        moments = encode_moments(vae, video)
        assert torch.allclose(moments, vae._encode(video), atol=1e-5)
        z = moments[:, :16]
        decoded = decode_latents(vae, z)
        assert torch.allclose(decoded.clamp(-1, 1), vae._decode(z).sample, atol=1e-5)
    avatar_vae = AvatarVAE(vae)
    normalized = avatar_vae.normalize(z)
    decoder = avatar_vae.new_decoder(normalized[:1, :, :1])
    streamed = torch.cat([decoder.decode(normalized[:1, :, 1:2]), decoder.decode(normalized[:1, :, 2:])], dim=2)
    assert torch.allclose(streamed, decoded[:1, :, 1:].clamp(-1, 1), atol=1e-4)


def test_saved_heldout_speech_renders_the_same_sample(tmp_path):
    cfg = load_config(None, {"video.size": "64*64"})
    bank = save_heldout_bank(tmp_path / "heldout.npz", 1)
    saved = heldout_samples(cfg, 1, bank, max_clips=2)[0]
    fresh = heldout_samples(cfg, 1, max_clips=2)[0]
    assert len(saved.frames) == 2 * cfg.video.infer_frames
    assert np.array_equal(saved.frames, fresh.frames) and np.array_equal(saved.audio, fresh.audio)
    assert np.array_equal(saved.opening, fresh.opening)


def test_learning_rate_warms_up_then_decays_to_its_floor():
    assert learning_rate(1.0, 0.0) < 0.05
    assert learning_rate(1.0, 0.03) == pytest.approx(1.0)
    assert learning_rate(1.0, 1.0) == pytest.approx(0.05)
    assert learning_rate(1.0, 0.5) > learning_rate(1.0, 0.8)
