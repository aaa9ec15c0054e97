"""The streaming scheme's per-session policies (`stream.*` keys): sink distances, initial noise, motion latents.

`reference` reproduces LiveAvatar's inference path (liveavatar/models/wan/causal_s2v_pipeline_tpp.py,
causal_model_s2v.py): per-step KV windows, motion latents = the VAE encoding of the reference image as a
73-frame still video for the whole stream, the sink swapped to the first generated latent frame after
clip 0, a sink distance drawn per DiT call, the clip's noise from a generator seeded seed + clip index.
`ours` is this project's earlier scheme. Every part is its own key (model/config.py `StreamConfig`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from model.config import StreamConfig
from model.net.motion import MOTION_LATENT_FRAMES
from model.vae.streaming import TIME_STRIDE, AvatarVAE

STILL_VIDEO_FRAMES = 73  # Wan2.2-S2V motion_frames (wan_s2v_14B.py): 1 + 4 * 18 frames -> 19 latent frames
assert (STILL_VIDEO_FRAMES - 1) // TIME_STRIDE + 1 == MOTION_LATENT_FRAMES
DECODER_PRIME_LATENTS = 7  # the reference primes its stream decoder with motion_latents[:, :, :7] (L1120)
LEGACY_SINK_DISTANCE = 30  # d = 30 puts the sink at max(30, F + 30) = F + 30: the DiT's fixed rule (None)


class SinkDistances:
    """The reference-sink distance of each DiT call: uniform in [low, high], from a generator seeded per session.

    LiveAvatar draws `random.randint(4, 30)` with Python's unseeded `random` on every call
    (causal_model_s2v.py L1140); drawing from `random.Random(seed)` keeps that distribution and makes a
    session reproducible. low == high fixes the distance; 30..30 is the DiT's fixed rule and yields None
    (same positions: max(30, F + 30) = F + 30)."""

    def __init__(self, low: int, high: int, seed: int) -> None:
        if not 1 <= low <= high:
            raise ValueError(f"sink distance range must satisfy 1 <= low <= high, got {low}..{high}")
        self.low, self.high = low, high
        self._random = random.Random(seed)

    @classmethod
    def from_config(cls, stream: StreamConfig, seed: int) -> SinkDistances:
        return cls(stream.sink_distance_min, stream.sink_distance_max, seed)

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def draw(self, calls: int) -> tuple[int | None, ...]:
        """The distances of a block's next `calls` DiT calls, in call order (None: the DiT's fixed +30 rule)."""
        if self.fixed:
            return (None if self.low == LEGACY_SINK_DISTANCE else self.low,) * calls
        return tuple(self._random.randint(self.low, self.high) for _ in range(calls))


def clip_noise(seed: int, clip_number: int, latent_shape: tuple[int, int, int, int], device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """The whole clip's initial noise [1, C, L, h, w] as the reference draws it: a generator on the device
    seeded seed + clip number, one randn of [C, L, h, w] in the model dtype (causal_s2v_pipeline_tpp.py
    L943-960); blocks are slices of it."""
    generator = torch.Generator(device).manual_seed(seed + clip_number)
    return torch.randn(latent_shape, generator=generator, device=device, dtype=dtype)[None]


@dataclass(frozen=True)
class MotionStart:
    """What a session's motion context starts from."""

    motion_latents: torch.Tensor  # [1, 16, MOTION_LATENT_FRAMES, h, w], oldest first
    decoder_prime: torch.Tensor  # [1, 16, P, h, w]: primes the streaming decoder, its frames discarded


def motion_start(stream: StreamConfig, vae: AvatarVAE, image: torch.Tensor, ref_latent: torch.Tensor) -> MotionStart:
    """Initial motion latents and decoder prime for `image` [1,3,H,W] in [-1,1] (its latent `ref_latent`)."""
    still = None
    if stream.motion_init == "still_video" or stream.decoder_prime == "still_video":
        # the reference: the image repeated as a 73-frame still video, one causal encode (L896-898)
        video = image[:, :, None].expand(-1, -1, STILL_VIDEO_FRAMES, -1, -1)
        still = vae.encode_video(video).to(ref_latent.device, ref_latent.dtype)  # 19 latent frames
    if stream.motion_init == "still_video":
        motion = still
    else:
        motion = ref_latent.expand(-1, -1, MOTION_LATENT_FRAMES, -1, -1).clone()
    prime = still[:, :, :DECODER_PRIME_LATENTS] if stream.decoder_prime == "still_video" else ref_latent
    return MotionStart(motion, prime)
