"""The Wan2.1 VAE (diffusers `AutoencoderKLWan`): reference-image encode and per-session streaming decode.

The decoder is causal in time: each of its 3D convolutions looks back two frames through a feature
cache. `StreamingDecoder` keeps that cache as its own explicit state, so one session decodes clip
after clip as if it were one long video, while the weights stay shared by every session.

Bounded context (`model.vae.stream_context_frames` P > 0): a decoder that was never trained on long
streams (the tiny bundle's) drifts through its own cache, clip after clip. Then every
`stream_restart_frames` R latent frames the decoder swaps its cache for a fresh one that has seen only
what a new session would (the reference latent as first chunk) and the last P latent frames: no cache
is ever older than P + R latent frames, while the causal convs still see the frames before each
swap, so the video continues across it. A fresh cache needs a few latent frames to settle, so
`stream_crossfade` fades the output from the old cache to the new one over those P frames.

GPU speed (`AvatarVAE.apply_runtime`): the decoder runs in the weights' dtype (bf16 with the model),
`runtime.vae_decode_chunk` latent frames per decoder call (the causal cache makes any chunking give
the same frames), optionally channels_last_3d for cuDNN's NDHWC conv3d kernels; the nearest-neighbour
upsampling runs in bf16 on CUDA (a copy of values: exact in any dtype). Nothing in the decode loop reads
a value back to the host; the caller's copy of the frames is the only sync.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanUpsample

from model.config import RuntimeConfig, VAEConfig
from model.vae.cpu_paths import use_cpu_fast_paths

TIME_STRIDE = 4  # video frames per latent frame (after the first)
SPACE_STRIDE = 8  # pixels per latent cell, each side


def build_vae(cfg: VAEConfig) -> AutoencoderKLWan:
    """An `AutoencoderKLWan` of the configured size with random weights (load weights afterwards)."""
    vae = AutoencoderKLWan(
        base_dim=cfg.base_dim,
        decoder_base_dim=cfg.decoder_base_dim,
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


class SameDtypeUpsample(WanUpsample):
    """`WanUpsample` without its float32 round trip on CUDA: nearest-neighbour copies values exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or self.mode not in ("nearest", "nearest-exact"):
            return super().forward(x)
        return F.interpolate(x, self.size, self.scale_factor, self.mode, self.align_corners,
                             recompute_scale_factor=self.recompute_scale_factor)


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
        self.decode_chunk = 1  # latent frames per decoder call (runtime.vae_decode_chunk)
        self.channels_last = False  # activations in channels_last_3d (runtime.vae_channels_last, CUDA)
        self.stream_context_frames = 0  # model.vae.stream_context_frames: 0 = one continuous cache
        self.stream_restart_frames = 9  # model.vae.stream_restart_frames (only with a context)
        self.stream_crossfade = True  # model.vae.stream_crossfade (only with a context)

    def apply_stream(self, cfg: VAEConfig) -> AvatarVAE:
        """Every later `new_decoder` uses the config's bounded context (`stream_context_frames` > 0) or not."""
        self.stream_context_frames = cfg.stream_context_frames
        self.stream_restart_frames = cfg.stream_restart_frames
        self.stream_crossfade = cfg.stream_crossfade
        return self

    def apply_runtime(self, runtime: RuntimeConfig) -> AvatarVAE:
        """Decode speed options: `runtime.vae_decode_chunk`, `vae_channels_last`, `cudnn_benchmark` (CUDA)."""
        self.decode_chunk = runtime.vae_decode_chunk
        cuda = self.device.type == "cuda"
        if cuda:
            for module in self.vae.decoder.modules():
                if type(module) is WanUpsample:
                    module.__class__ = SameDtypeUpsample
        if runtime.vae_channels_last and cuda:
            self.channels_last = True
            for param in self.vae.decoder.parameters():
                if param.ndim == 5:
                    param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
        if runtime.cudnn_benchmark and cuda:
            torch.backends.cudnn.benchmark = True
        return self

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

    @torch.inference_mode()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B,3,1+4n,H,W] in [-1,1] -> normalised latents [B,16,1+n,H/8,W/8] (posterior mode).

        The causal encode of Wan's VAE (`WanVAE.encode`, diffusers `_encode`): the first frame alone, then
        4 frames per call through one private cache, so latent 0 is the first frame's own latent and every
        later one a 4-frame group's."""
        if video.ndim != 5 or video.shape[1] != 3 or (video.shape[2] - 1) % TIME_STRIDE:
            raise ValueError(f"expected a video [B,3,1+4n,H,W], got shape {tuple(video.shape)}")
        video = video.to(self.device, self.dtype)
        cache: list = [None] * self._encoder_convs
        chunks = [video[:, :, :1]] + list(video[:, :, 1:].split(TIME_STRIDE, dim=2))
        moments = torch.cat([self.vae.encoder(chunk, feat_cache=cache, feat_idx=[0]) for chunk in chunks], dim=2)
        moments = self.vae.quant_conv(moments)
        return self.normalize(moments[:, : self.latent_channels])

    def new_decoder(self, prime_latent: torch.Tensor, context_frames: int | None = None,
                    restart_frames: int | None = None, crossfade: bool | None = None) -> StreamingDecoder:
        """A decoder for one session, its causal cache primed with `prime_latent` [B,16,P,h,w] (the reference
        image's latent, or the first 7 latents of its still video as LiveAvatar primes), whose frames are discarded.

        `context_frames`/`restart_frames` override `apply_stream`'s (the drift diagnosis compares both ways)."""
        context = self.stream_context_frames if context_frames is None else context_frames
        restart = self.stream_restart_frames if restart_frames is None else restart_frames
        return StreamingDecoder(self, prime_latent, context, restart, self.stream_crossfade if crossfade is None
                                else crossfade)


class StreamingDecoder:
    """One session's online decode: latent clips in, exactly 4 frames per latent frame out, cache carried.

    The causal VAE turns its first latent frame into 1 frame and every later one into 4 (1 + 4(n-1)).
    We spend that first-frame rule on the prime when the session starts (the reference image's latent, or
    the first 7 latents of its 73-frame still video as LiveAvatar primes its stream decoder; their frames
    are discarded), so every clip's L latent frames decode to exactly 4L frames and clip 0 continues from
    the reference image. The cache holds the last two time steps of each causal conv's input: its size
    is fixed by the frame size, whatever the number of clips.

    With `context_frames` P > 0 (module docstring) the cache in use is replaced every `restart_frames`
    R latent frames by one that has seen only the prime and the last P latent frames. That
    successor is started P frames ahead, from a copy of the cache as primed, and
    decodes those P frames alongside the cache in use: at the restart it holds exactly what a fresh
    cache primed the same way and then fed the last P frames would, without a burst of extra work
    at the restart and without a buffer of old latents. With `crossfade`, the output of those P
    overlapping frames fades from the old cache's frames to the successor's, so the restart is not a
    step. Restarts fall on latent-frame counts, not on calls, so any split of the stream into calls
    (clips, blocks, `decode_chunk`) gives the same frames, as with the continuous cache (P = 0).
    """

    def __init__(self, vae: AvatarVAE, prime_latent: torch.Tensor, context_frames: int = 0,
                 restart_frames: int = 9, crossfade: bool = True) -> None:
        if not 0 <= context_frames <= restart_frames:
            raise ValueError(f"need 0 <= context_frames <= restart_frames, got {context_frames} and {restart_frames} "
                             "(model.vae.stream_context_frames, stream_restart_frames)")
        self._vae = vae
        self._feat_cache: list[torch.Tensor | str | None] | None = [None] * vae._decoder_convs
        self.frames_decoded = 0
        self.restarts = 0
        self._context_frames = context_frames
        self._restart_frames = restart_frames
        self._crossfade = crossfade
        self._next_cache: list[torch.Tensor | str | None] | None = None  # the successor, during the overlap
        self._since_restart = 0  # latent frames decoded on the cache in use
        self._decode_latents(prime_latent[:, :, :1], first_chunk=True, cache=self._feat_cache)
        if prime_latent.shape[2] > 1:  # a longer prime (the reference's 7 still-video latents) goes on as a stream
            self._decode_latents(prime_latent[:, :, 1:], first_chunk=False, cache=self._feat_cache)
        # every successor starts from this state (entries are replaced, never written in place: a list copy will do)
        self._primed = list(self._feat_cache) if context_frames else None

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,16,L,h,w] -> video [B,3,4L,8h,8w] in [-1,1], continuing the previous clip."""
        if self._feat_cache is None:
            raise RuntimeError("this StreamingDecoder was closed; start a new session to decode again")
        if not self._context_frames:
            video = self._decode_latents(latents, first_chunk=False, cache=self._feat_cache)
        else:
            video = self._decode_bounded(latents)
        self.frames_decoded += video.shape[2]
        return video

    def _decode_bounded(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode in runs that end where the successor starts or takes over; the successor decodes its runs too."""
        overlap_from = self._restart_frames - self._context_frames  # position where the successor starts
        parts = []
        start = 0
        while start < latents.shape[2]:
            since = self._since_restart
            run_end = overlap_from if since < overlap_from else self._restart_frames  # in the current window
            stop = min(latents.shape[2], start + run_end - since)
            run = latents[:, :, start:stop]
            video = self._decode_latents(run, first_chunk=False, cache=self._feat_cache)
            if since >= overlap_from:
                if self._next_cache is None:
                    self._next_cache = list(self._primed)
                fresh = self._decode_latents(run, first_chunk=False, cache=self._next_cache)
                if self._crossfade:
                    video = video.lerp_(fresh, self._fade_weights(since - overlap_from, video))
            parts.append(video)
            self._since_restart += stop - start
            start = stop
            if self._since_restart == self._restart_frames:
                self._feat_cache, self._next_cache = self._next_cache, None
                self._since_restart = 0
                self.restarts += 1
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _fade_weights(self, offset: int, video: torch.Tensor) -> torch.Tensor:
        """Successor's weight for each frame of a run `offset` latent frames into the overlap: a ramp over 4P frames."""
        steps = TIME_STRIDE * self._context_frames + 1
        first = TIME_STRIDE * offset + 1
        ramp = torch.arange(first, first + video.shape[2], device=video.device, dtype=video.dtype) / steps
        return ramp.view(1, 1, -1, 1, 1)

    def _decode_latents(self, latents: torch.Tensor, first_chunk: bool,
                        cache: list[torch.Tensor | str | None]) -> torch.Tensor:
        vae = self._vae
        with torch.inference_mode():
            x = vae.vae.post_quant_conv(vae.denormalize(latents.to(vae.device, vae.dtype)))
            if vae.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            frames = []
            # `decode_chunk` latent frames per call (default 1, as diffusers' own decode loop: the lowest
            # peak memory); the causal cache makes every chunking give the same frames.
            chunk = 1 if first_chunk else max(1, vae.decode_chunk)
            for i in range(0, x.shape[2], chunk):
                frames.append(vae.vae.decoder(x[:, :, i:i + chunk], feat_cache=cache, feat_idx=[0],
                                              first_chunk=first_chunk and i == 0))
            video = frames[0] if len(frames) == 1 else torch.cat(frames, dim=2)
            return video.clamp_(-1.0, 1.0)

    def cache_bytes(self) -> int:
        """Bytes held by the causal cache, and with a bounded context by the primed copy and the successor
        during an overlap (fixed by the frame size and the position in the restart cycle; the memory tests watch it)."""
        held = {id(t): t for c in (self._feat_cache, self._primed, self._next_cache) for t in c or []
                if isinstance(t, torch.Tensor)}
        return sum(t.numel() * t.element_size() for t in held.values())

    def close(self) -> None:
        """Drop the causal caches (the session is over)."""
        self._feat_cache = None
        self._next_cache = None
        self._primed = None
