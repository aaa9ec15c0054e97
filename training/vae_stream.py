"""Decoder-only fine-tune of the VAE on long sequences decoded the way the server decodes them.

The first VAE phase trains on one clip (reference + 12 frames). Live, one `StreamingDecoder` decodes the
reference latent and then clip after clip on the same causal cache, and a decoder that never saw its own
cache after a clip boundary washes the colours out from clip 2 on. Here the decoder is primed with the
reference scheme's prime (the first 7 latents of the reference's still video, decoded and discarded as the
server does) and then decodes each clip's
latents in its own call on the carried cache, with gradients through the cache (or truncated every
`bptt_clips` clips, the cache detached). The encoder and quant_conv stay frozen: the latents the DiT was
trained on (the whole stream encoded from its start) are exactly the latents decoded here.

Optional burn-in clips are decoded without gradients first, so the decoder also learns from caches deeper
into a session than the clips it backpropagates through.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from model.stream.scheme import DECODER_PRIME_LATENTS
from model.vae.streaming import TIME_STRIDE, _count_causal_convs
from training.stream_pool import Stream
from training.vae_training import MOUTH_WEIGHT, _autocast, encode_moments, prefetched, to_video_tensor

COLOUR_WEIGHT = 1.0  # per-frame mean colour term: the wash-out is a low-frequency colour error


@dataclass(frozen=True)
class StreamBatch:
    """Reference + `(burn + clips) * frames_per_clip` frames per example; only the last `clips` clips count."""

    video: np.ndarray  # uint8 [B, 1 + (burn + clips) * F, H, W, 3]
    weight: np.ndarray  # float32 [B, H, W] (mouth box heavier)
    burn: int
    clips: int
    frames_per_clip: int


def decoder_parameters(vae: AutoencoderKLWan) -> list[torch.nn.Parameter]:
    """What this phase trains: post_quant_conv and the decoder (the encoder side stays as the DiT knows it)."""
    return [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]


def freeze_encoder(vae: AutoencoderKLWan) -> None:
    """Encoder and quant_conv without gradients; the decoder side trainable."""
    vae.requires_grad_(False)
    for param in decoder_parameters(vae):
        param.requires_grad_(True)


def long_streams(streams: list[Stream], min_clips: int) -> list[Stream]:
    return [s for s in streams if s.num_clips >= min_clips]


def stream_batch(streams: list[Stream], batch_size: int, clips: int, max_burn: int, frames_per_clip: int,
                 rng: np.random.Generator) -> StreamBatch:
    """A batch of stream starts: reference, then the first `burn + clips` clips (burn drawn per batch)."""
    if not long_streams(streams, clips):
        raise ValueError(f"no stream has {clips} clips (longest: {max(s.num_clips for s in streams)}); "
                         "lower --stream-clips")
    burn = int(rng.integers(0, max_burn + 1))
    while burn and len(long_streams(streams, burn + clips)) < max(1, len(streams) // 8):
        burn -= 1  # too few streams that long: a shallower start rather than the same few streams again
    pool = long_streams(streams, burn + clips)
    count = (burn + clips) * frames_per_clip
    videos, weights = [], []
    for _ in range(batch_size):
        sample = pool[int(rng.integers(len(pool)))].sample
        videos.append(np.concatenate([sample.reference[None], sample.frames[:count]]))
        weight = np.ones(sample.frames.shape[1:3], np.float32)
        x0, y0, x1, y1 = sample.mouth_box
        weight[y0:y1, x0:x1] = MOUTH_WEIGHT
        weights.append(weight)
    return StreamBatch(np.stack(videos), np.stack(weights), burn, clips, frames_per_clip)


@torch.no_grad()
def stream_latents(vae: AutoencoderKLWan, video: torch.Tensor, sample: bool = True) -> torch.Tensor:
    """Raw latents [B,16,1+k,h,w] of the frozen encoder over the whole video (posterior sample or mean)."""
    moments = encode_moments(vae, video).float()
    z_dim = vae.config.z_dim
    mean = moments[:, :z_dim]
    if not sample:
        return mean
    logvar = moments[:, z_dim:].clamp(-30.0, 20.0)
    return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


class CachedDecoder:
    """The decoder side of `StreamingDecoder` with autograd: raw latents in, unclamped frames out, cache kept."""

    def __init__(self, vae: AutoencoderKLWan, prime_latent: torch.Tensor) -> None:
        self.vae = vae
        self.cache: list = [None] * _count_causal_convs(vae.decoder)
        self._run(prime_latent[:, :, :1], first_chunk=True)  # its frames are discarded, as the server does
        if prime_latent.shape[2] > 1:
            self._run(prime_latent[:, :, 1:], first_chunk=False)

    def _run(self, latents: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        x = self.vae.post_quant_conv(latents)
        return self.vae.decoder(x, feat_cache=self.cache, feat_idx=[0], first_chunk=first_chunk)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """One clip's raw latents [B,16,L,h,w] -> [B,3,4L,H,W], continuing on the carried cache."""
        return self._run(latents, first_chunk=False)

    def detach(self) -> None:
        """Cut the graph at the cache (truncated backprop): later clips still see the same values."""
        self.cache = [c.detach() if torch.is_tensor(c) else c for c in self.cache]


def frame_loss(decoded: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mouth-weighted L1 and MSE (as the VAE phase) plus the error of each frame's mean colour."""
    w = weight[:, None, None]
    diff = decoded.float() - target
    l1 = (diff.abs() * w).mean() / w.mean()
    mse = (diff.pow(2) * w).mean() / w.mean()
    colour = diff.mean(dim=(3, 4)).abs().mean()
    return {"l1": l1, "mse": mse, "colour": colour}


def stream_loss_backward(vae: AutoencoderKLWan, video: torch.Tensor, weight: torch.Tensor, burn: int, clips: int,
                         frames_per_clip: int, bptt_clips: int = 0, scale: float = 1.0,
                         on_clip: Callable[[int, CachedDecoder], None] | None = None) -> dict[str, torch.Tensor]:
    """Decode reference + burn-in (no grad) + `clips` clips through one cache; backward the loss.

    The loss is the mean over the counted clips, backpropagated every `bptt_clips` clips (0: once, through
    the whole sequence), times `scale` (micro-batches). Returns detached per-term means and per-clip L1.
    """
    per_clip = frames_per_clip // TIME_STRIDE
    z = stream_latents(vae, video)
    # The reference scheme primes the decoder with the first 7 latents of the reference's still video.
    still = video[:, :, :1].expand(-1, -1, 1 + (DECODER_PRIME_LATENTS - 1) * TIME_STRIDE, -1, -1)
    prime = stream_latents(vae, still, sample=False)
    segment = bptt_clips if bptt_clips > 0 else clips
    totals: dict[str, torch.Tensor] = {}
    clip_l1 = []
    with _autocast(video.device):
        with torch.no_grad() if burn else torch.enable_grad():
            decoder = CachedDecoder(vae, prime)
            for k in range(burn):
                decoder.decode(z[:, :, 1 + k * per_clip: 1 + (k + 1) * per_clip])
                if on_clip is not None:
                    on_clip(k, decoder)
        if burn:
            decoder.detach()
        pending = []
        for j in range(clips):
            k = burn + j
            decoded = decoder.decode(z[:, :, 1 + k * per_clip: 1 + (k + 1) * per_clip])
            if on_clip is not None:
                on_clip(k, decoder)
            target = video[:, :, 1 + k * frames_per_clip: 1 + (k + 1) * frames_per_clip]
            terms = frame_loss(decoded, target, weight)
            pending.append(terms["l1"] + terms["mse"] + COLOUR_WEIGHT * terms["colour"])
            clip_l1.append(terms["l1"].detach())
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.detach() / clips
            if len(pending) == segment or j == clips - 1:
                (torch.stack(pending).sum() * (scale / clips)).backward()
                pending = []
                decoder.detach()
    totals["loss"] = totals["l1"] + totals["mse"] + COLOUR_WEIGHT * totals["colour"]
    return {**totals, "clip_l1": torch.stack(clip_l1)}


def train_vae_stream_steps(vae: AutoencoderKLWan, optimizer: torch.optim.Optimizer, streams: list[Stream],
                           steps: int, batch_size: int, clips: int, max_burn: int, frames_per_clip: int,
                           device: torch.device | str, rng: np.random.Generator, bptt_clips: int = 0,
                           micro_batches: list[int] | None = None, log_every: int = 50, on_log=None,
                           lr_at: Callable[[], float] | None = None,
                           should_stop: Callable[[], bool] | None = None) -> int:
    """Up to `steps` decoder steps on stream batches; returns the steps taken.

    `micro_batches` (a one-item list the caller keeps) splits each batch for gradient accumulation; it
    doubles after a CUDA out-of-memory error and the step is retried, so a too-large batch costs one step.
    """
    micro = micro_batches if micro_batches is not None else [1]
    vae.train()
    freeze_encoder(vae)
    params = decoder_parameters(vae)
    done = 0
    batches = prefetched(lambda: stream_batch(streams, batch_size, clips, max_burn, frames_per_clip, rng), steps)
    try:
        for step, batch in enumerate(batches):
            if should_stop is not None and should_stop():
                break
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at() * group.get("lr_scale", 1.0)
            video = to_video_tensor(batch.video, device)
            weight = torch.from_numpy(batch.weight).to(device)
            while True:
                optimizer.zero_grad(set_to_none=True)
                try:
                    parts = [p for p in np.array_split(np.arange(len(video)), micro[0]) if len(p)]
                    stats = [stream_loss_backward(vae, video[p], weight[p], batch.burn, batch.clips,
                                                  batch.frames_per_clip, bptt_clips, scale=len(p) / len(video))
                             for p in parts]
                    break
                except torch.OutOfMemoryError:
                    if micro[0] >= len(video):
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    micro[0] *= 2
                    print(f"vae_stream: out of memory, {micro[0]} micro-batches per step", flush=True)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            done += 1
            if on_log is not None and (step % log_every == 0 or step == steps - 1):
                merged = {k: sum(float(s[k]) * len(p) for s, p in zip(stats, parts)) / len(video)
                          for k in ("loss", "l1", "mse", "colour")}
                clip_l1 = sum(s["clip_l1"] * len(p) for s, p in zip(stats, parts)) / len(video)
                on_log(step, {**merged, "grad_norm": float(grad_norm), "burn": batch.burn,
                              "clip_l1": [round(float(v), 4) for v in clip_l1],
                              "micro": micro[0], "lr": optimizer.param_groups[0]["lr"]})
    finally:
        batches.close()
    vae.eval().requires_grad_(False)
    return done
