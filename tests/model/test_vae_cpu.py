"""The frame-stacked CPU convolution is the VAE's causal conv3d, to float rounding, in every shape the VAE uses."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from model.config import load_config
from model.cpu_conv import StackedFrameCausalConv3d, use_stacked_frame_convs
from model.vae import build_vae


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
    assert use_stacked_frame_convs(fast) == 1
    x = torch.randn(2, in_ch, 5, 12, 10)
    cache = None if cache_frames is None else torch.randn(2, in_ch, cache_frames, 12, 10)
    expected, got = reference(x, cache), fast(x, cache)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_the_stacked_path() -> None:
    conv = WanCausalConv3d(4, 4, 3, 1, 1)
    use_stacked_frame_convs(conv)
    x = torch.randn(1, 4, 3, 8, 8, requires_grad=True)
    conv(x).square().sum().backward()
    assert x.grad is not None and conv.weight.grad is not None and x.grad.abs().sum() > 0


def test_the_built_vae_uses_the_stacked_convs_everywhere() -> None:
    vae = build_vae(load_config().model.vae)
    kinds = {type(m) for m in vae.modules() if isinstance(m, WanCausalConv3d)}
    assert kinds == {StackedFrameCausalConv3d}
