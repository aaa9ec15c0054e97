"""Training the tiny Wan VAE on the synthetic streams, and fitting its latents to the DiT's unit scale.

The VAE sees what it will see live: the reference still first (the decoder is primed with it), then
talking frames. Pixels inside the mouth box weigh more, because lip sync lives in a few dozen pixels.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from training.stream_pool import Stream

MOUTH_WEIGHT = 6.0
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


def vae_loss(vae: AutoencoderKLWan, video: torch.Tensor, pixel_weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Weighted L1 + MSE reconstruction of a [B,3,1+4k,H,W] video plus a small KL."""
    posterior = vae.encode(video).latent_dist
    decoded = vae.decode(posterior.sample()).sample
    weight = pixel_weight[:, None, None]
    l1 = ((decoded - video).abs() * weight).mean() / weight.mean()
    mse = (((decoded - video) ** 2) * weight).mean() / weight.mean()
    kl = posterior.kl().mean() / video[0].numel()
    loss = l1 + mse + KL_WEIGHT * kl
    return loss, {"l1": float(l1.detach()), "mse": float(mse.detach()), "kl": float(kl.detach())}


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
        moments = vae._encode(to_video_tensor(video[chunk], device))
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


def train_vae_steps(vae: AutoencoderKLWan, optimizer: torch.optim.Optimizer, streams: list[Stream], steps: int,
                    batch_size: int, num_frames: int, device: torch.device | str, rng: np.random.Generator,
                    log_every: int = 50, on_log=None) -> dict:
    """Run `steps` optimisation steps; returns the last step's loss terms."""
    vae.train().requires_grad_(True)
    stats: dict = {}
    for step in range(steps):
        video, weight = vae_batch(streams, batch_size, num_frames, rng)
        loss, stats = vae_loss(vae, to_video_tensor(video, device), torch.from_numpy(weight).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        stats["loss"] = float(loss.detach())
        if on_log is not None and (step % log_every == 0 or step == steps - 1):
            on_log(step, stats)
    vae.eval().requires_grad_(False)
    return stats
