"""Training the tiny DiT (and its wav2vec2) as a few-step flow-matching model, through the streaming calls.

Each example replays what the live pipeline does before clip k of a stream: prefill the sink with the
reference and the motion context of that moment, commit the previous clean blocks to the KV window, then
predict the flow velocity of clip k at a noise level the sampler actually visits. The prefill and the
noisy block carry gradients; the committed window is context only (it is the model's own output live).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Wav2Vec2Model

from model.encoders.audio import frame_feature_positions, sample_rows
from model.net.dit import AvatarDiT
from model.net.motion import MOTION_LATENT_FRAMES
from model.stream.sampler import MAX_SAMPLE_STEPS, FlowMatchSchedule
from model.stream.scheme import STILL_VIDEO_FRAMES
from model.vae.streaming import SPACE_STRIDE, TIME_STRIDE, AvatarVAE
from training.stream_pool import Stream, StreamGeometry
from training.vae_training import encode_moments, to_video_tensor

MOUTH_WEIGHT = 8.0
# Share of examples at the server's default step count; the rest spread over 1..8 steps (live control).
DEFAULT_STEPS_SHARE = 0.6

# The DiT's streaming calls run under no_grad for serving; training calls the same code with autograd on.
_prefill_with_grad = AvatarDiT.prefill.__wrapped__
_forward_with_grad = AvatarDiT.forward.__wrapped__


@dataclass
class LatentStream:
    """One stream in the DiT's units: reference latent, clean clip latents, clip windows, mouth cells."""

    ref_latent: torch.Tensor  # [16, 1, h, w]
    latents: torch.Tensor  # [16, num_clips * latent_frames_per_clip, h, w]
    windows: torch.Tensor  # float32 [num_clips, context + clip]
    mouth_cells: tuple[int, int, int, int]  # x0, y0, x1, y1 on the latent grid
    # The reference scheme's static motion latents: the reference as a 73-frame still video [16, 19, h, w].
    motion: torch.Tensor | None = None

    @property
    def num_clips(self) -> int:
        return self.windows.shape[0]


@torch.no_grad()
def encode_streams(vae: AvatarVAE, streams: list[Stream], geometry: StreamGeometry,
                   device: torch.device | str) -> list[LatentStream]:
    """Encode [reference, frames...] of each stream with the causal VAE (posterior mean, normalised)."""
    out = []
    for stream in streams:
        frames = stream.sample.frames[: stream.num_clips * geometry.frames_per_clip]
        video = to_video_tensor(np.concatenate([stream.sample.reference[None], frames])[None], device)
        moments = encode_moments(vae.vae, video.to(vae.dtype))
        latents = vae.normalize(moments[:, : vae.latent_channels])[0].float()
        x0, y0, x1, y1 = stream.sample.mouth_box
        cells = (x0 // SPACE_STRIDE, y0 // SPACE_STRIDE, -(-x1 // SPACE_STRIDE), -(-y1 // SPACE_STRIDE))
        out.append(LatentStream(ref_latent=latents[:, :1], latents=latents[:, 1:],
                                windows=torch.from_numpy(stream.windows).to(device), mouth_cells=cells))
    for start in range(0, len(out), 32):
        chunk = out[start:start + 32]
        motion = still_video_latents(vae, np.stack([s.sample.reference for s in streams[start:start + 32]]), device)
        for latent_stream, latents in zip(chunk, motion, strict=True):
            latent_stream.motion = latents
    return out


def still_video_latents(vae: AvatarVAE, references: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """The reference scheme's motion latents of reference images [B, H, W, 3]: each as a 73-frame still video,
    encoded [B, 16, 19, h, w] (`model.stream.scheme.motion_start`, through the same `AvatarVAE.encode_video`)."""
    video = to_video_tensor(np.repeat(references[:, None], STILL_VIDEO_FRAMES, axis=1), device)
    return vae.encode_video(video.to(vae.dtype)).float().clone()  # clone: a normal tensor, not an inference one


def audio_features(wav2vec2: Wav2Vec2Model, windows: torch.Tensor, geometry: StreamGeometry) -> torch.Tensor:
    """Batched `AudioEncoder.encode_window`, differentiable: windows [B, N] -> [B, frames, layers + 1, hidden]."""
    mean = windows.mean(dim=1, keepdim=True)
    normed = (windows - mean) / torch.sqrt(windows.var(dim=1, unbiased=False, keepdim=True) + 1e-7)
    hidden = torch.stack(wav2vec2(normed, output_hidden_states=True).hidden_states, dim=2)  # [B, rows, L, H]
    positions = frame_feature_positions(geometry.context_samples / geometry.sample_rate_hz, geometry.fps,
                                        geometry.frames_per_clip)
    return sample_rows(hidden.transpose(0, 1), positions).transpose(0, 1)


def motion_context(ref_latent: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """The pipeline's motion latents before a clip: reference copies, then every earlier clip, newest last."""
    history = torch.cat([ref_latent.expand(-1, -1, MOTION_LATENT_FRAMES, -1, -1), previous], dim=2)
    return history[:, :, -MOTION_LATENT_FRAMES:]


def sample_sigma(rng: np.random.Generator, default_steps: int, shift: float) -> float:
    """A noise level the sampler visits: mostly the default schedule's, sometimes another step count's."""
    steps = default_steps if rng.random() < DEFAULT_STEPS_SHARE else int(rng.integers(1, MAX_SAMPLE_STEPS + 1))
    schedule = FlowMatchSchedule(steps, shift)
    return float(schedule.sigmas[int(rng.integers(steps))])


@dataclass
class DiTBatch:
    """B streams at the same clip index k, everything the replay of clips max(0, k - window)..k needs."""

    clip_index: int
    streams: list[LatentStream]


def sample_batch(latent_streams: list[LatentStream], batch_size: int, max_clip_index: int,
                 rng: np.random.Generator) -> DiTBatch:
    """Random clip index (a quarter of the time the stream's first clip), then streams long enough for it."""
    longest = max(s.num_clips for s in latent_streams)
    top = min(max_clip_index, longest - 1)
    k = 0 if rng.random() < 0.25 or top == 0 else int(rng.integers(1, top + 1))
    eligible = [s for s in latent_streams if s.num_clips > k]
    picks = rng.integers(len(eligible), size=batch_size)
    return DiTBatch(clip_index=k, streams=[eligible[int(i)] for i in picks])


def dit_loss(dit: AvatarDiT, wav2vec2: Wav2Vec2Model, text_contexts: torch.Tensor, batch: DiTBatch,
             geometry: StreamGeometry, sample_steps: int, shift: float, rng: np.random.Generator,
             noise_draws: int = 2) -> tuple[torch.Tensor, dict]:
    """Mean velocity error of clip k over `noise_draws` noise levels, mouth cells weighted up."""
    device = dit.device
    k, streams = batch.clip_index, batch.streams
    b = len(streams)
    per_clip = geometry.frames_per_clip // TIME_STRIDE
    block = dit.cfg.num_frames_per_block
    ref = torch.stack([s.ref_latent for s in streams])  # [B, 16, 1, h, w]
    latents = torch.stack([s.latents[:, : (k + 1) * per_clip] for s in streams])  # [B, 16, (k+1)F, h, w]
    prompt_rows = torch.from_numpy(rng.integers(text_contexts.shape[0], size=b)).to(device)
    text = text_contexts[prompt_rows]
    first = max(0, k - (dit.cfg.kv_cache_blocks - 1) * block // per_clip)
    clips = list(range(first, k + 1))
    windows = torch.stack([torch.stack([s.windows[c] for c in clips]) for s in streams])  # [B, C, N]
    features = audio_features(wav2vec2, windows.flatten(0, 1), geometry).unflatten(0, (b, len(clips)))

    cache = dit.new_cache(b, device, dit.dtype)
    with torch.no_grad():
        for j, clip in enumerate(clips[:-1]):
            dit.prefill(cache, ref, text, motion_context(ref, latents[:, :, : clip * per_clip]))
            for i in range(per_clip // block):
                start = clip * per_clip + i * block
                dit.commit(cache, latents[:, :, start:start + block],
                           features[:, j, i * block * TIME_STRIDE:(i + 1) * block * TIME_STRIDE].detach(), start)
    _prefill_with_grad(dit, cache, ref, text, motion_context(ref, latents[:, :, : k * per_clip]))

    # A clip of several blocks trains its first block; later blocks are the same problem one step on.
    start = k * per_clip
    clean = latents[:, :, start:start + block]
    audio = features[:, -1, : block * TIME_STRIDE]
    weight = torch.ones_like(clean[:, :1])
    for row, s in enumerate(streams):
        x0, y0, x1, y1 = s.mouth_cells
        weight[row, :, :, y0:y1, x0:x1] = MOUTH_WEIGHT
    losses = []
    for _ in range(noise_draws):
        sigma = torch.tensor([sample_sigma(rng, sample_steps, shift) for _ in range(b)], device=device)
        noise = torch.randn_like(clean)
        s5 = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1 - s5) * clean + s5 * noise
        velocity = _forward_with_grad(dit, noisy, sigma * 1000.0, audio, cache, start)
        losses.append(((velocity - (noise - clean)) ** 2 * weight).mean() / weight.mean())
    loss = torch.stack(losses).mean()
    return loss, {"loss": loss.detach(), "clip_index": k}


def train_dit_steps(dit: AvatarDiT, wav2vec2: Wav2Vec2Model, optimizer: torch.optim.Optimizer,
                    text_contexts: torch.Tensor, latent_streams: list[LatentStream], geometry: StreamGeometry,
                    steps: int, batch_size: int, sample_steps: int, shift: float, rng: np.random.Generator,
                    max_clip_index: int = 6, log_every: int = 50, on_log=None,
                    lr_at: Callable[[], float] | None = None, should_stop: Callable[[], bool] | None = None) -> int:
    """Up to `steps` optimisation steps over DiT and wav2vec2 (fewer when `should_stop()`); returns the steps taken.

    `lr_at()` sets the learning rate before each step; a group's `lr_scale` multiplies it.
    """
    dit.train()
    done = 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for step in range(steps):
        if should_stop is not None and should_stop():
            break
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at() * group.get("lr_scale", 1.0)
        batch = sample_batch(latent_streams, batch_size, max_clip_index, rng)
        loss, stats = dit_loss(dit, wav2vec2, text_contexts, batch, geometry, sample_steps, shift, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        done += 1
        if on_log is not None and (step % log_every == 0 or step == steps - 1):
            numbers = {k: float(v) if torch.is_tensor(v) else v for k, v in stats.items()}
            on_log(step, {**numbers, "lr": optimizer.param_groups[0]["lr"]})
    dit.eval()
    return done
