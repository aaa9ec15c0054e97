"""The Wan2.1 VAE (diffusers `AutoencoderKLWan`): reference-image encode and per-session streaming decode.

The decoder is causal in time: each of its 3D convolutions looks back two frames through a feature
cache. `StreamingDecoder` keeps that cache as its own explicit state, so one session decodes clip
after clip as if it were one long video, while the weights stay shared by every session.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from model.config import VAEConfig
from model.vae_cpu import use_cpu_fast_paths

TIME_STRIDE = 4  # video frames per latent frame (after the first)
SPACE_STRIDE = 8  # pixels per latent cell, each side


def build_vae(cfg: VAEConfig) -> AutoencoderKLWan:
    """An `AutoencoderKLWan` of the configured size with random weights (load weights afterwards)."""
    vae = AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temporal_downsample),
    )
    if len(vae.config.latents_mean) != cfg.z_dim:
        raise ValueError(f"model.vae.z_dim={cfg.z_dim} but the Wan2.1 latent statistics have "
                         f"{len(vae.config.latents_mean)} channels; use z_dim 16")
    use_cpu_fast_paths(vae)  # same weights and outputs; oneDNN conv2d instead of slow_conv3d on the CPU
    return vae.eval().requires_grad_(False)


def _count_causal_convs(module: torch.nn.Module) -> int:
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


class AvatarVAE:
    """Shared VAE weights plus the latent statistics that turn raw VAE latents into the DiT's unit scale."""

    def __init__(self, vae: AutoencoderKLWan) -> None:
        self.vae = vae
        param = next(vae.parameters())
        self.device, self.dtype = param.device, param.dtype
        stats_shape = (1, vae.config.z_dim, 1, 1, 1)
        self.latents_mean = torch.tensor(vae.config.latents_mean, device=self.device).view(stats_shape)
        self.latents_std = torch.tensor(vae.config.latents_std, device=self.device).view(stats_shape)
        self.latent_channels = vae.config.z_dim
        self._encoder_convs = _count_causal_convs(vae.encoder)
        self._decoder_convs = _count_causal_convs(vae.decoder)

    def normalize(self, raw_latent: torch.Tensor) -> torch.Tensor:
        """VAE latent -> DiT latent, as diffusers' Wan pipelines do: (z - mean) / std."""
        return ((raw_latent.float() - self.latents_mean) / self.latents_std).to(raw_latent.dtype)

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        """DiT latent -> VAE latent: z * std + mean."""
        return (latent.float() * self.latents_std + self.latents_mean).to(latent.dtype)

    @torch.inference_mode()
    def encode_reference(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B,3,H,W] in [-1,1] -> normalised latent [B,16,1,H/8,W/8] (posterior mode, no sampling)."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"expected an image batch [B,3,H,W], got shape {tuple(image.shape)}")
        _, _, height, width = image.shape
        if height % SPACE_STRIDE or width % SPACE_STRIDE:
            raise ValueError(f"image size {height}x{width} must be a multiple of {SPACE_STRIDE}")
        video = image.to(self.device, self.dtype).unsqueeze(2)  # [B,3,1,H,W]
        # A private cache list instead of vae.encode(), whose cache lives on the shared module.
        moments = self.vae.encoder(video, feat_cache=[None] * self._encoder_convs, feat_idx=[0])
        moments = self.vae.quant_conv(moments)
        mean = moments[:, : self.latent_channels]
        return self.normalize(mean)

    def new_decoder(self, prime_latent: torch.Tensor) -> StreamingDecoder:
        """A decoder for one session, its causal cache primed with `prime_latent` (the reference)."""
        return StreamingDecoder(self, prime_latent)


class StreamingDecoder:
    """One session's online decode: latent clips in, exactly 4 frames per latent frame out, cache carried.

    The causal VAE turns its first latent frame into 1 frame and every later one into 4 (1 + 4(n-1)).
    We spend that first-frame rule on the reference latent when the session starts (its one frame is
    discarded), so every clip's L latent frames decode to exactly 4L frames and clip 0 continues from
    the reference image. The cache holds the last two time steps of each causal conv's input: its size
    is fixed by the frame size, whatever the number of clips.
    """

    def __init__(self, vae: AvatarVAE, prime_latent: torch.Tensor) -> None:
        self._vae = vae
        self._feat_cache: list[torch.Tensor | str | None] | None = [None] * vae._decoder_convs
        self.frames_decoded = 0
        self._decode_latents(prime_latent[:, :, :1], first_chunk=True)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,16,L,h,w] -> video [B,3,4L,8h,8w] in [-1,1], continuing the previous clip."""
        if self._feat_cache is None:
            raise RuntimeError("this StreamingDecoder was closed; start a new session to decode again")
        video = self._decode_latents(latents, first_chunk=False)
        self.frames_decoded += video.shape[2]
        return video

    def _decode_latents(self, latents: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        vae = self._vae
        with torch.inference_mode():
            x = vae.vae.post_quant_conv(vae.denormalize(latents.to(vae.device, vae.dtype)))
            frames = []
            # One latent frame per call, as diffusers' own decode loop does: the lowest peak memory,
            # and the cache makes it identical to decoding the block at once.
            for i in range(x.shape[2]):
                frames.append(vae.vae.decoder(x[:, :, i:i + 1], feat_cache=self._feat_cache, feat_idx=[0],
                                              first_chunk=first_chunk and i == 0))
            return torch.cat(frames, dim=2).clamp_(-1.0, 1.0)

    def cache_bytes(self) -> int:
        """Bytes held by the causal cache (fixed by the frame size; the memory tests watch it)."""
        return sum(t.numel() * t.element_size() for t in self._feat_cache or [] if isinstance(t, torch.Tensor))

    def close(self) -> None:
        """Drop the causal cache (the session is over)."""
        self._feat_cache = None
