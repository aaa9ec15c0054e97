"""Training the tiny Wan VAE on the synthetic streams, and fitting its latents to the DiT's unit scale.

The VAE sees what it will see live: the reference still first (the decoder is primed with it), then
talking frames. Pixels inside the mouth box weigh more, because lip sync lives in a few dozen pixels.

Encoder and decoder run in two calls each, the first frame and then all later frames at once, on the
same causal caches diffusers' per-frame loops and the server's `StreamingDecoder` use: every causal
conv sees the same inputs, so the outputs are the same (tests/training checks it), with a quarter of
the kernel launches. On CUDA the step runs under bfloat16 autocast.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from model.vae.streaming import _count_causal_convs
from training.stream_pool import Stream

MOUTH_WEIGHT = 12.0
KL_WEIGHT = 1e-5


def to_video_tensor(frames: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float [B, 3, T, H, W] in [-1, 1]."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return video.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)


def vae_batch(streams: list[Stream], batch_size: int, num_frames: int, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """[B, 1 + num_frames, H, W, 3] (reference, then a random run of frames) and per-pixel weights [B, H, W]."""
    videos, weights = [], []
    for _ in range(batch_size):
        stream = streams[int(rng.integers(len(streams)))]
        frames = stream.sample.frames
        start = int(rng.integers(0, max(1, len(frames) - num_frames)))
        run = frames[start:start + num_frames]
        if len(run) < num_frames:
            run = np.concatenate([run, np.repeat(run[-1:], num_frames - len(run), axis=0)])
        videos.append(np.concatenate([stream.sample.reference[None], run]))
        weight = np.ones(frames.shape[1:3], np.float32)
        x0, y0, x1, y1 = stream.sample.mouth_box
        weight[y0:y1, x0:x1] = MOUTH_WEIGHT
        weights.append(weight)
    return np.stack(videos), np.stack(weights)


def encode_moments(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """`vae._encode(video)` ([B,3,1+4k,H,W] -> moments [B,32,1+k,h,w]) in two encoder calls."""
    cache: list = [None] * _count_causal_convs(vae.encoder)
    first = vae.encoder(video[:, :, :1], feat_cache=cache, feat_idx=[0])
    if video.shape[2] == 1:
        return vae.quant_conv(first)
    rest = vae.encoder(video[:, :, 1:], feat_cache=cache, feat_idx=[0])
    return vae.quant_conv(torch.cat([first, rest], dim=2))


def decode_latents(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """The streaming decode of raw latents [B,16,1+k,h,w] -> [B,3,1+4k,H,W], unclamped, in two decoder calls.

    The first latent is decoded as a first chunk (one frame), as `StreamingDecoder` does with the
    reference; the rest continue on the causal cache, 4 frames each.
    """
    x = vae.post_quant_conv(z)
    cache: list = [None] * _count_causal_convs(vae.decoder)
    first = vae.decoder(x[:, :, :1], feat_cache=cache, feat_idx=[0], first_chunk=True)
    if x.shape[2] == 1:
        return first
    return torch.cat([first, vae.decoder(x[:, :, 1:], feat_cache=cache, feat_idx=[0])], dim=2)


def _autocast(device: torch.device | str):
    # VAE_FP32=1 turns bf16 autocast off (a fallback should a CUDA build misbehave under it).
    use = torch.device(device).type == "cuda" and os.environ.get("VAE_FP32", "0") != "1"
    return torch.autocast("cuda", dtype=torch.bfloat16) if use else contextlib.nullcontext()


def vae_loss(vae: AutoencoderKLWan, video: torch.Tensor, pixel_weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Weighted L1 + MSE reconstruction of a [B,3,1+4k,H,W] video plus a small KL (bf16 autocast on CUDA)."""
    with _autocast(video.device):
        moments = encode_moments(vae, video).float()
        z_dim = vae.config.z_dim
        mean, logvar = moments[:, :z_dim], moments[:, z_dim:].clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        decoded = decode_latents(vae, z).float()
    weight = pixel_weight[:, None, None]
    l1 = ((decoded - video).abs() * weight).mean() / weight.mean()
    mse = (((decoded - video) ** 2) * weight).mean() / weight.mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3, 4)).mean() / video[0].numel()
    loss = l1 + mse + KL_WEIGHT * kl
    # Tensors, not floats: reading a number waits for the GPU, so the loop reads them only when it logs.
    return loss, {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}


@torch.no_grad()
def fit_latent_scale(vae: AutoencoderKLWan, streams: list[Stream], device: torch.device | str,
                     num_videos: int = 64, num_frames: int = 12, seed: int = 0) -> dict[str, list[float]]:
    """Fold a per-channel affine map into quant_conv/post_quant_conv so that (z - mean) / std is ~N(0, 1).

    The DiT path normalises latents with the Wan2.1 statistics in the VAE's config; a freshly trained
    VAE has its own. Rewriting the two 1x1x1 convs keeps decode(encode(x)) exactly as trained.
    """
    rng = np.random.default_rng([seed, 5])
    video, _ = vae_batch(streams, num_videos, num_frames, rng)
    z_dim = vae.config.z_dim
    means = []
    for chunk in np.array_split(np.arange(num_videos), max(1, num_videos // 16)):
        moments = encode_moments(vae, to_video_tensor(video[chunk], device))
        means.append(moments[:, :z_dim].float())
    raw = torch.cat(means).transpose(0, 1).flatten(1)  # [z, N]
    fitted_mean, fitted_std = raw.mean(1), raw.std(1).clamp_min(1e-4)
    target_mean = torch.tensor(vae.config.latents_mean, device=raw.device)
    target_std = torch.tensor(vae.config.latents_std, device=raw.device)
    scale = target_std / fitted_std
    offset = target_mean - scale * fitted_mean
    quant, post = vae.quant_conv, vae.post_quant_conv
    quant.weight[:z_dim] *= scale.view(-1, 1, 1, 1, 1)
    quant.bias[:z_dim] = quant.bias[:z_dim] * scale + offset
    quant.bias[z_dim:] += 2 * torch.log(scale)  # logvar of a scaled variable
    w = post.weight[:, :, 0, 0, 0].clone()  # [out, in]
    post.bias -= w @ (offset / scale)
    post.weight /= scale.view(1, -1, 1, 1, 1)
    return {"fitted_mean": fitted_mean.tolist(), "fitted_std": fitted_std.tolist()}


def prefetched(make: Callable[[], tuple], count: int) -> Iterator[tuple]:
    """`count` results of `make()`, each made on a helper thread while the previous one is used."""
    box: dict = {}
    worker: threading.Thread | None = None

    def fill() -> None:
        box["next"] = make()

    try:
        for index in range(count):
            if worker is None:
                fill()
            else:
                worker.join()
            item = box.pop("next")
            worker = None
            if index + 1 < count:
                worker = threading.Thread(target=fill, daemon=True)
                worker.start()
            yield item
    finally:  # closed early: wait for the batch in flight, so nobody else draws from the same rng meanwhile
        if worker is not None:
            worker.join()


def train_vae_steps(vae: AutoencoderKLWan, optimizer: torch.optim.Optimizer, streams: list[Stream], steps: int,
                    batch_size: int, num_frames: int, device: torch.device | str, rng: np.random.Generator,
                    log_every: int = 50, on_log=None, lr_at: Callable[[], float] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> int:
    """Up to `steps` optimisation steps (fewer when `should_stop()` says so); returns the steps taken.

    `lr_at()` sets every group's learning rate before each step (the caller's schedule).
    """
    vae.train().requires_grad_(True)
    done = 0
    batches = prefetched(lambda: vae_batch(streams, batch_size, num_frames, rng), steps)
    for step, (video, weight) in enumerate(batches):
        if should_stop is not None and should_stop():
            break
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at() * group.get("lr_scale", 1.0)
        loss, stats = vae_loss(vae, to_video_tensor(video, device), torch.from_numpy(weight).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        stats["loss"] = loss.detach()
        done += 1
        if on_log is not None and (step % log_every == 0 or step == steps - 1):
            numbers = {k: float(v) if torch.is_tensor(v) else v for k, v in stats.items()}
            on_log(step, {**numbers, "lr": optimizer.param_groups[0]["lr"]})
    # The prefetch thread may still be filling one batch; let it finish before the rng is used again.
    batches.close()
    vae.eval().requires_grad_(False)
    return done
