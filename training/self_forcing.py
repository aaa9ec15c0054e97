"""Training the tiny DiT on its own rollouts under the reference streaming scheme (self-forcing style).

Every step replays what `StreamingAvatar` does with `stream.scheme reference`, for a batch of streams:
the sink prefilled with the reference latent, the static motion latents (the reference's 73-frame still video)
and the prompt; one KV window per sampling step, each written by that step's call (`kv_update per_step`); a
sink distance drawn per DiT call in 4..30; after clip 0 the sink swapped to the first generated latent frame;
motion tokens at their absolute RoPE frames while the stream runs on (the rollout starts at a random frame
of a long stream, so the distances of a stream minutes in are trained too).

Each block is denoised by the model itself over all its steps (no gradient), as at inference; at one step
drawn per block the same call is made again with gradients (on a copy of that step's window, the sink
recomputed with gradients) and its clean-latent prediction x0 = x - sigma * v is pulled to the true block
(mouth cells weighted up). So the model learns from the context it makes itself, errors included: to take
everything but the mouth from the sink and not to build on its own mistakes. With `teacher` the rollout
runs on the true latents instead (noised to each step's level): the warm-up before the model can roll out.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Wav2Vec2Model

from model.net.dit import AvatarDiT, StreamCache
from model.stream.sampler import FlowMatchSchedule, euler_step
from model.vae.streaming import TIME_STRIDE
from training.dit_training import MOUTH_WEIGHT, LatentStream, audio_features
from training.stream_pool import StreamGeometry

_prefill_with_grad = AvatarDiT.prefill.__wrapped__
_forward_with_grad = AvatarDiT.forward.__wrapped__

SINK_DISTANCE_RANGE = (4, 30)  # the reference scheme's draw per DiT call (stream.sink_distance_min/max)
LONG_STREAM_SHARE = 0.5  # rollouts that start deep into a stream (motion tokens far behind)
MAX_START_FRAME = 2400  # latent frames: 10 minutes at 16 fps


@dataclass(frozen=True)
class RolloutPlan:
    """One training rollout: which streams, how many clips, from which latent frame, teacher or self."""

    streams: list[LatentStream]
    clips: int
    start_frame: int
    teacher: bool


def plan_rollout(latent_streams: list[LatentStream], batch_size: int, max_clips: int, min_clips: int,
                 block_frames: int, teacher: bool, rng: np.random.Generator) -> RolloutPlan:
    """`batch_size` streams long enough for a rollout of min..max clips, starting at frame 0 or deep in."""
    longest = max(s.num_clips for s in latent_streams)
    clips = int(rng.integers(min(min_clips, longest), min(max_clips, longest) + 1))
    eligible = [s for s in latent_streams if s.num_clips >= clips]
    picks = rng.integers(len(eligible), size=batch_size)
    start = 0
    if rng.random() < LONG_STREAM_SHARE:
        start = int(rng.integers(0, MAX_START_FRAME // block_frames + 1)) * block_frames
    return RolloutPlan([eligible[int(i)] for i in picks], clips, start, teacher)


def clone_cache(cache: StreamCache) -> StreamCache:
    """A copy of a window whose tensors the gradient call may overwrite (the rollout keeps the original)."""
    twin = copy.copy(cache)
    for name in ("kv_k", "kv_v", "text_k", "text_v"):
        setattr(twin, name, getattr(cache, name).clone())
    twin.slot_frame_start = list(cache.slot_frame_start)
    twin.rope = dict(cache.rope)
    twin.device_positions = dict(cache.device_positions)
    return twin


def rollout_loss(dit: AvatarDiT, wav2vec2: Wav2Vec2Model, text_contexts: torch.Tensor, plan: RolloutPlan,
                 geometry: StreamGeometry, sample_steps: int, shift: float, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, dict]:
    """Roll the batch out over `plan.clips` clips as the reference scheme does; the mean x0 error of one
    gradient call per block (mouth weighted), and per-clip errors for the log."""
    device, dtype = dit.device, dit.dtype
    streams, b = plan.streams, len(plan.streams)
    block = dit.cfg.num_frames_per_block
    per_clip = geometry.frames_per_clip // TIME_STRIDE
    blocks_per_clip = per_clip // block
    ref = torch.stack([s.ref_latent for s in streams]).to(dtype)  # [B, 16, 1, h, w]
    motion = torch.stack([s.motion for s in streams]).to(dtype)  # [B, 16, 19, h, w]
    truth = torch.stack([s.latents[:, : plan.clips * per_clip] for s in streams])  # [B, 16, K*F, h, w]
    text = text_contexts[torch.from_numpy(rng.integers(text_contexts.shape[0], size=b)).to(device)]
    windows = torch.stack([s.windows[: plan.clips] for s in streams])  # [B, K, N]
    features = audio_features(wav2vec2, windows.flatten(0, 1), geometry).unflatten(0, (b, plan.clips))
    weight = torch.ones_like(truth[:, :1, :block])
    for row, s in enumerate(streams):
        x0, y0, x1, y1 = s.mouth_cells
        weight[row, :, :, y0:y1, x0:x1] = MOUTH_WEIGHT

    schedule = FlowMatchSchedule(sample_steps, shift)
    sigmas = schedule.sigmas.tolist()
    rings = [dit.new_cache(b, device, dtype, motion_rope="absolute") for _ in range(sample_steps)]
    sink = ref
    for ring in rings:
        dit.prefill(ring, sink, text, motion)
    losses, clip_errors = [], []
    for clip in range(plan.clips):
        clip_error = []
        for i in range(blocks_per_clip):
            index = clip * blocks_per_clip + i
            frame_start = plan.start_frame + index * block
            clean = truth[:, :, index * block:(index + 1) * block]
            audio = features[:, clip, i * block * TIME_STRIDE:(i + 1) * block * TIME_STRIDE]
            noise = torch.randn_like(clean)
            x = noise.to(dtype)
            grad_step = int(rng.integers(sample_steps))
            for step in range(sample_steps):
                distance = int(rng.integers(SINK_DISTANCE_RANGE[0], SINK_DISTANCE_RANGE[1] + 1))
                if plan.teacher:
                    x = ((1 - sigmas[step]) * clean + sigmas[step] * noise).to(dtype)
                t = torch.full((b,), float(schedule.timesteps[step]), device=device)
                if step == grad_step:
                    twin = clone_cache(rings[step])
                    _prefill_with_grad(dit, twin, sink, text, motion)  # the sink's K/V with gradients
                    velocity = _forward_with_grad(dit, x, t, audio, twin, frame_start, sink_distance=distance)
                    predicted = x.float() - sigmas[step] * velocity
                    error = ((predicted - clean) ** 2 * weight).mean() / weight.mean()
                    losses.append(error)
                    clip_error.append(error.detach())
                with torch.no_grad():
                    velocity = dit(x, t, audio.detach(), rings[step], frame_start, store_slot=True,
                                   sink_distance=distance)
                x = euler_step(x, velocity, schedule, step)
            if clip == 0 and i == 0:
                first_frame = (clean if plan.teacher else x.float())[:, :, :1].to(dtype)
        clip_errors.append(torch.stack(clip_error).mean())
        if clip == 0:  # the sink swap: the first generated latent frame replaces the reference, once
            sink = first_frame.detach()
            for ring in rings:
                dit.prefill(ring, sink, text, motion)
    loss = torch.stack(losses).mean()
    return loss, {"loss": loss.detach(), "clips": plan.clips, "start": plan.start_frame,
                  "teacher": int(plan.teacher), "clip_errors": torch.stack(clip_errors)}


def teacher_share(progress: float, until: float = 0.3, floor: float = 0.1) -> float:
    """Share of teacher rollouts: all at first, falling to `floor` by `until` of the phase."""
    return max(floor, 1.0 - progress / until) if until > 0 else floor


def train_rollout_steps(dit: AvatarDiT, wav2vec2: Wav2Vec2Model, optimizer: torch.optim.Optimizer,
                        text_contexts: torch.Tensor, latent_streams: list[LatentStream], geometry: StreamGeometry,
                        steps: int, batch_size: int, sample_steps: int, shift: float, rng: np.random.Generator,
                        max_clips: int = 8, min_clips: int = 2, log_every: int = 50, on_log=None,
                        lr_at: Callable[[], float] | None = None, should_stop: Callable[[], bool] | None = None,
                        progress_at: Callable[[], float] | None = None, teacher_until: float = 0.3) -> int:
    """Up to `steps` rollout steps over DiT and wav2vec2 (fewer when `should_stop()`); returns the steps taken."""
    dit.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    done = 0
    for step in range(steps):
        if should_stop is not None and should_stop():
            break
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at() * group.get("lr_scale", 1.0)
        teacher = rng.random() < teacher_share(progress_at() if progress_at is not None else 1.0, teacher_until)
        plan = plan_rollout(latent_streams, batch_size, max_clips, min_clips, dit.cfg.num_frames_per_block, teacher,
                            rng)
        loss, stats = rollout_loss(dit, wav2vec2, text_contexts, plan, geometry, sample_steps, shift, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        done += 1
        if on_log is not None and (step % log_every == 0 or step == steps - 1):
            numbers = {k: float(v) if torch.is_tensor(v) and v.ndim == 0 else v for k, v in stats.items()}
            numbers["clip_errors"] = [round(float(v), 4) for v in stats["clip_errors"]]
            on_log(step, {**numbers, "lr": optimizer.param_groups[0]["lr"]})
    dit.eval()
    return done
