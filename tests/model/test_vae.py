"""Wan2.1 VAE wrapper: reference encode shapes, and a streaming decode equal to decoding the whole video."""
from __future__ import annotations

import pytest
import torch

from model.config import VAEConfig
from model.vae import AvatarVAE, build_vae

SIZE = 32  # pixels; small so the 3D convs run in milliseconds on one core


@pytest.fixture(scope="module")
def vae() -> AvatarVAE:
    torch.manual_seed(0)
    return AvatarVAE(build_vae(VAEConfig(base_dim=16, num_res_blocks=1)))


def test_reference_latent_has_16_channels_one_frame_and_8x_smaller_sides(vae):
    image = torch.rand(2, 3, SIZE, 2 * SIZE) * 2 - 1
    latent = vae.encode_reference(image)
    assert latent.shape == (2, 16, 1, SIZE // 8, 2 * SIZE // 8)
    assert latent.dtype == torch.float32
    assert torch.isfinite(latent).all()


def test_normalize_and_denormalize_are_inverse(vae):
    raw = torch.randn(1, 16, 2, 4, 4)
    torch.testing.assert_close(vae.denormalize(vae.normalize(raw)), raw)


def test_each_clip_decodes_to_four_frames_per_latent_frame(vae):
    decoder = vae.new_decoder(torch.randn(1, 16, 1, SIZE // 8, SIZE // 8))
    for latent_frames in (3, 1, 2):
        video = decoder.decode(torch.randn(1, 16, latent_frames, SIZE // 8, SIZE // 8))
        assert video.shape == (1, 3, 4 * latent_frames, SIZE, SIZE)
        assert video.min() >= -1 and video.max() <= 1
    assert decoder.frames_decoded == 24


def test_streaming_decode_equals_decoding_the_whole_video_at_once(vae):
    """Carrying the causal cache makes clip-by-clip decode bit-identical to one long decode."""
    reference = torch.randn(1, 16, 1, SIZE // 8, SIZE // 8)
    clips = [torch.randn(1, 16, 3, SIZE // 8, SIZE // 8) for _ in range(3)]
    decoder = vae.new_decoder(reference)
    streamed = torch.cat([decoder.decode(c) for c in clips], dim=2)
    with torch.inference_mode():
        whole = vae.vae.decode(vae.denormalize(torch.cat([reference, *clips], dim=2))).sample
    assert whole.shape[2] == 1 + streamed.shape[2]  # the reference's one frame is the only extra
    torch.testing.assert_close(streamed, whole[:, :, 1:], rtol=0, atol=1e-5)


def test_two_sessions_decode_independently_on_shared_weights(vae):
    reference = torch.randn(1, 16, 1, SIZE // 8, SIZE // 8)
    clip = torch.randn(1, 16, 3, SIZE // 8, SIZE // 8)
    first = vae.new_decoder(reference)
    expected = first.decode(clip)
    other = vae.new_decoder(torch.randn(1, 16, 1, SIZE // 8, SIZE // 8))
    other.decode(torch.randn(1, 16, 3, SIZE // 8, SIZE // 8))
    again = vae.new_decoder(reference)
    torch.testing.assert_close(again.decode(clip), expected, rtol=0, atol=0)


def test_decoder_cache_does_not_grow_with_clips(vae):
    decoder = vae.new_decoder(torch.randn(1, 16, 1, SIZE // 8, SIZE // 8))

    decoder.decode(torch.randn(1, 16, 3, SIZE // 8, SIZE // 8))
    after_one = decoder.cache_bytes()
    for _ in range(5):
        decoder.decode(torch.randn(1, 16, 3, SIZE // 8, SIZE // 8))
    assert decoder.cache_bytes() == after_one > 0


def test_closed_decoder_refuses_to_decode(vae):
    decoder = vae.new_decoder(torch.randn(1, 16, 1, SIZE // 8, SIZE // 8))
    decoder.close()
    assert decoder.cache_bytes() == 0
    with pytest.raises(RuntimeError, match="closed"):
        decoder.decode(torch.randn(1, 16, 1, SIZE // 8, SIZE // 8))


@pytest.mark.parametrize("chunk", [2, 3, 12])
def test_decoding_several_latent_frames_per_call_gives_the_same_frames(chunk):
    """runtime.vae_decode_chunk (fewer, larger decoder calls on a GPU) changes no frame."""
    from model.config import RuntimeConfig

    torch.manual_seed(0)
    vae = AvatarVAE(build_vae(VAEConfig(base_dim=16, num_res_blocks=1)))
    reference = torch.randn(1, 16, 1, SIZE // 8, SIZE // 8)
    clips = [torch.randn(1, 16, 3, SIZE // 8, SIZE // 8) for _ in range(3)]
    one = vae.new_decoder(reference)
    expected = [one.decode(c) for c in clips]
    vae.apply_runtime(RuntimeConfig(vae_decode_chunk=chunk))
    assert vae.decode_chunk == chunk
    chunked = vae.new_decoder(reference)
    for clip, frames in zip(clips, expected):
        torch.testing.assert_close(chunked.decode(clip), frames, rtol=0, atol=1e-5)
