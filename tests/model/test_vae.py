"""Wan2.1 VAE wrapper: reference encode shapes, and a streaming decode equal to decoding the whole video."""
from __future__ import annotations

import pytest
import torch

from model.config import VAEConfig
from model.vae.streaming import AvatarVAE, build_vae

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


# ---- bounded-context streaming decode (model.vae.stream_context_frames > 0)

def _latents(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed)).unsqueeze(0) \
        .permute(0, 2, 1, 3, 4).contiguous()  # [1, 16, count, h, w]


def _continuous_decode(vae: AvatarVAE, reference: torch.Tensor, clips: list[torch.Tensor]) -> torch.Tensor:
    """The decode loop as it was before bounded contexts: one cache, reference as first chunk, then clip by clip,
    latent frame by latent frame."""
    cache = [None] * vae._decoder_convs
    frames = []
    with torch.inference_mode():
        vae.vae.decoder(vae.vae.post_quant_conv(vae.denormalize(reference)), feat_cache=cache, feat_idx=[0],
                        first_chunk=True)
        for clip in clips:
            x = vae.vae.post_quant_conv(vae.denormalize(clip))
            video = torch.cat([vae.vae.decoder(x[:, :, i:i + 1], feat_cache=cache, feat_idx=[0])
                               for i in range(x.shape[2])], dim=2)
            frames.append(video.clamp_(-1.0, 1.0))
    return torch.cat(frames, dim=2)


def test_zero_context_is_the_continuous_decoder_exactly(vae):
    reference, latents = _latents(1, 1), _latents(24, 2)
    clips = [latents[:, :, i:i + 3] for i in range(0, 24, 3)]
    decoder = vae.new_decoder(reference, context_frames=0, restart_frames=3)
    streamed = torch.cat([decoder.decode(clip) for clip in clips], dim=2)
    assert torch.equal(streamed, _continuous_decode(vae, reference, clips))
    assert decoder.restarts == 0 and decoder.frames_decoded == 96


@pytest.mark.parametrize("context, restart", [(1, 3), (2, 4), (3, 3)])
def test_without_crossfade_each_window_is_a_fresh_cache_fed_the_reference_and_the_last_frames(vae, context, restart):
    """What the bounded decoder promises: after each restart, exactly what a new decoder primed with the reference
    and then fed the last `context` latent frames (output dropped) would decode."""
    reference, latents = _latents(1, 3), _latents(4 * restart, 4)
    decoder = vae.new_decoder(reference, context, restart, crossfade=False)
    got = torch.cat([decoder.decode(latents[:, :, i:i + 2]) for i in range(0, latents.shape[2], 2)], dim=2)
    expected = [vae.new_decoder(reference, 0).decode(latents[:, :, :restart])]
    for start in range(restart, latents.shape[2], restart):
        fresh = vae.new_decoder(reference, 0)
        fresh.decode(latents[:, :, start - context:start])
        expected.append(fresh.decode(latents[:, :, start:start + restart]))
    torch.testing.assert_close(got, torch.cat(expected, dim=2), rtol=0, atol=1e-5)
    assert decoder.restarts == 4  # one swap at the end of each window, the last included


def test_crossfade_ramps_from_the_old_cache_to_the_new_over_the_shared_frames(vae):
    context, restart = 2, 4
    reference, latents = _latents(1, 5), _latents(2 * restart - context, 6)  # one overlap and swap
    hard = vae.new_decoder(reference, context, restart, crossfade=False).decode(latents)
    faded = vae.new_decoder(reference, context, restart, crossfade=True).decode(latents)
    shared = slice(4 * (restart - context), 4 * restart)  # the frames both caches decode
    fresh = vae.new_decoder(reference, 0).decode(latents[:, :, restart - context:restart])
    weights = torch.arange(1, 4 * context + 1, dtype=torch.float32).view(1, 1, -1, 1, 1) / (4 * context + 1)
    torch.testing.assert_close(faded[:, :, shared], hard[:, :, shared] + (fresh - hard[:, :, shared]) * weights,
                               rtol=0, atol=1e-5)
    outside = torch.ones(faded.shape[2], dtype=torch.bool)
    outside[shared] = False
    torch.testing.assert_close(faded[:, :, outside], hard[:, :, outside], rtol=0, atol=0)


@pytest.mark.parametrize("split", [1, 2, 5, 12])
def test_bounded_decode_does_not_depend_on_how_the_stream_is_split(vae, split):
    """Restarts follow latent-frame counts, so clips, blocks or single frames give the same video."""
    reference, latents = _latents(1, 7), _latents(24, 8)
    whole = vae.new_decoder(reference, 3, 9).decode(latents)
    decoder = vae.new_decoder(reference, 3, 9)
    parts = torch.cat([decoder.decode(latents[:, :, i:i + split]) for i in range(0, 24, split)], dim=2)
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)


def test_bounded_decode_keeps_frame_counts_and_cache_bytes_fixed_over_many_clips(vae):
    decoder = vae.new_decoder(_latents(1, 9), context_frames=3, restart_frames=9)
    sizes = []
    for clip in range(30):  # 90 latent frames: 10 restarts
        video = decoder.decode(_latents(3, 100 + clip))
        assert video.shape == (1, 3, 12, SIZE, SIZE)
        sizes.append(decoder.cache_bytes())
    assert decoder.frames_decoded == 360 and decoder.restarts == 10
    assert len(set(sizes)) == 1 and sizes[0] > 0
    # calls that do not line up with restarts hold the successor across calls now and then, never more
    unaligned = vae.new_decoder(_latents(1, 9), context_frames=3, restart_frames=9)
    seen = [unaligned.decode(_latents(2, 200 + i)).shape[2] == 8 and unaligned.cache_bytes() for i in range(45)]
    assert max(seen[27:]) == max(seen[:27]) and all(seen)
    decoder.close()
    assert decoder.cache_bytes() == 0


def test_context_longer_than_the_restart_period_is_refused(vae):
    with pytest.raises(ValueError, match="context_frames <= restart_frames"):
        vae.new_decoder(_latents(1, 1), context_frames=4, restart_frames=3)


def test_config_sets_the_bounded_decode_of_every_new_decoder():
    torch.manual_seed(0)
    vae = AvatarVAE(build_vae(VAEConfig(base_dim=16, num_res_blocks=1)))
    assert vae.stream_context_frames == 0
    vae.apply_stream(VAEConfig(stream_context_frames=2, stream_restart_frames=6, stream_crossfade=False))
    reference, latents = _latents(1, 1), _latents(12, 2)
    decoder = vae.new_decoder(reference)
    decoder.decode(latents)
    assert decoder.restarts == 2
    torch.testing.assert_close(vae.new_decoder(reference).decode(latents),
                               vae.new_decoder(reference, 2, 6, crossfade=False).decode(latents), rtol=0, atol=0)
