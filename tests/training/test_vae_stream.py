"""The streaming decoder fine-tune: it carries the cache across clips as the server does and trains only the decoder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import load_config
from model.vae.streaming import AvatarVAE, build_vae
from training.speech import make_utterance
from training.stream_pool import build_pool
from training.talking_dataset import split_identities
from training.train_tiny import geometry_of
from training.vae_stream import (
    CachedDecoder,
    decoder_parameters,
    stream_batch,
    stream_latents,
    train_vae_stream_steps,
)
from training.vae_training import to_video_tensor

FRAMES = 4  # frames per clip at this test's scale (one latent frame per clip)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = load_config(None, {"video.size": "32*32", "video.sizing": "crop"})  # below the aspect rule's 64-pixel steps
    streams = build_pool([make_utterance(3)], split_identities("train"), 2, geometry_of(cfg), seed=0)
    return cfg, streams


def test_cached_decoder_matches_the_streaming_decoder_clip_by_clip(setup):
    cfg, streams = setup
    vae = build_vae(cfg.model.vae)
    batch = stream_batch(streams, 1, clips=3, max_burn=0, frames_per_clip=FRAMES, rng=np.random.default_rng(0))
    video = to_video_tensor(batch.video, "cpu")
    z = stream_latents(vae, video, sample=False)
    decoder = CachedDecoder(vae, z[:, :, :1])
    avatar_vae = AvatarVAE(vae)
    served = avatar_vae.new_decoder(avatar_vae.normalize(z[:, :, :1]))
    fresh_second = None
    with torch.no_grad():
        for k in range(3):
            clip = z[:, :, 1 + k: 2 + k]
            ours = decoder.decode(clip)
            theirs = served.decode(avatar_vae.normalize(clip))
            assert ours.shape == (1, 3, FRAMES, 32, 32)
            assert torch.allclose(ours.clamp(-1, 1), theirs, atol=1e-4)
            if k == 1:
                fresh_second = CachedDecoder(vae, z[:, :, :1]).decode(clip)
                carried_second = ours
    # The cache carries clip 0 into clip 1: a decoder that only saw the reference draws clip 1 differently.
    assert not torch.allclose(fresh_second, carried_second, atol=1e-3)


def test_stream_step_trains_the_decoder_through_the_cache_and_keeps_the_encoder(setup):
    cfg, streams = setup
    torch.manual_seed(1)
    vae = build_vae(cfg.model.vae)
    optimizer = torch.optim.AdamW(decoder_parameters(vae), lr=1e-3)
    encoder = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    decoder = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    logs, micro = [], [2]
    done = train_vae_stream_steps(vae, optimizer, streams, 2, batch_size=2, clips=3, max_burn=1,
                                  frames_per_clip=FRAMES, device="cpu", rng=np.random.default_rng(0),
                                  micro_batches=micro, log_every=1, on_log=lambda s, st: logs.append(st))
    assert done == 2 and len(logs) == 2
    assert all(len(st["clip_l1"]) == 3 and np.isfinite(st["loss"]) for st in logs)
    state = vae.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder.items()), "the encoder changed"
    assert any(not torch.equal(state[k], v) for k, v in decoder.items()), "the decoder did not train"
    assert not any(p.requires_grad for p in vae.parameters())


def test_gradient_of_a_late_clip_reaches_the_reference_prime_through_the_cache(setup):
    cfg, streams = setup
    vae = build_vae(cfg.model.vae)
    batch = stream_batch(streams, 1, clips=2, max_burn=0, frames_per_clip=FRAMES, rng=np.random.default_rng(0))
    z = stream_latents(vae, to_video_tensor(batch.video, "cpu"), sample=False)
    prime = z[:, :, :1].clone().requires_grad_(True)
    first = z[:, :, 1:2].clone().requires_grad_(True)
    decoder = CachedDecoder(vae, prime)
    decoder.decode(first)
    decoder.decode(z[:, :, 2:3]).square().mean().backward()
    assert prime.grad is not None and prime.grad.abs().sum() > 0
    assert first.grad is not None and first.grad.abs().sum() > 0
    # Truncated backprop: after detach the cache keeps its values but no longer leads back to earlier clips.
    cached = [c for c in decoder.cache if torch.is_tensor(c)]
    assert cached and any(c.requires_grad for c in cached)
    decoder.detach()
    after = [c for c in decoder.cache if torch.is_tensor(c)]
    assert not any(c.requires_grad for c in after)
    assert all(torch.equal(x, y) for x, y in zip(cached, after))
