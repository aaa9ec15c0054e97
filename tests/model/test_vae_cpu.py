"""The VAE's CPU fast paths compute what the library's layers compute, in every shape the VAE uses."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

from model.config import load_config
from model.vae.cpu_paths import PlaneSumRMSNorm, StackedFrameCausalConv3d, use_cpu_fast_paths
from model.vae.streaming import build_vae


@pytest.mark.parametrize(
    "in_ch, out_ch, kernel, stride, padding",
    [
        (16, 32, 3, 1, 1),  # residual-block conv
        (16, 32, (3, 1, 1), 1, (1, 0, 0)),  # the decoder's time upsampler
        (8, 8, (3, 1, 1), (2, 1, 1), 0),  # the encoder's time downsampler
        (8, 8, 3, (1, 2, 2), 0),
        (8, 4, 1, 1, 0),  # 1x1x1 shortcut
    ],
)
@pytest.mark.parametrize("cache_frames", [None, 1, 2])
def test_stacked_frames_match_conv3d(in_ch, out_ch, kernel, stride, padding, cache_frames) -> None:
    torch.manual_seed(0)
    reference = WanCausalConv3d(in_ch, out_ch, kernel, stride, padding)
    fast = WanCausalConv3d(in_ch, out_ch, kernel, stride, padding)
    fast.load_state_dict(reference.state_dict())
    assert use_cpu_fast_paths(fast) == 1
    x = torch.randn(2, in_ch, 5, 12, 10)
    cache = None if cache_frames is None else torch.randn(2, in_ch, cache_frames, 12, 10)
    expected, got = reference(x, cache), fast(x, cache)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_the_stacked_path() -> None:
    conv = WanCausalConv3d(4, 4, 3, 1, 1)
    use_cpu_fast_paths(conv)
    x = torch.randn(1, 4, 3, 8, 8, requires_grad=True)
    conv(x).square().sum().backward()
    assert x.grad is not None and conv.weight.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("images", [True, False])
def test_plane_sum_norm_matches_the_library_norm(images: bool) -> None:
    torch.manual_seed(0)
    reference = WanRMS_norm(12, channel_first=True, images=images)
    with torch.no_grad():
        reference.gamma.uniform_(0.5, 1.5)
    fast = WanRMS_norm(12, channel_first=True, images=images)
    fast.load_state_dict(reference.state_dict())
    assert use_cpu_fast_paths(fast) == 1
    x = torch.randn(2, 12, 7, 9) if images else torch.randn(2, 12, 3, 7, 9)
    x[0, :, 0] = 0.0  # an all-zero pixel: both must give 0, not NaN
    torch.testing.assert_close(fast(x), reference(x), atol=1e-6, rtol=1e-5)


def test_the_built_vae_uses_the_fast_paths_everywhere() -> None:
    vae = build_vae(load_config().model.vae)
    convs = {type(m) for m in vae.modules() if isinstance(m, WanCausalConv3d)}
    norms = {type(m) for m in vae.modules() if isinstance(m, WanRMS_norm)}
    assert convs == {StackedFrameCausalConv3d}
    assert norms == {PlaneSumRMSNorm}
