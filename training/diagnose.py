"""Where lip sync is lost: the ground truth itself, the VAE round trip, and the whole model, on held-out samples.

    python -m training.diagnose --bundle model/assets/tiny_avatar.safetensors --count 2 [--full]

The VAE row encodes the true frames (reference first, as training does) and decodes them through the
server's `StreamingDecoder`, clip by clip: if that row already loses the mouth, no DiT can bring it back.
`--full` adds the whole model through `StreamingAvatar` (slow on the CPU: about 1-2 frames/s).

    python -m training.diagnose --drift --bundle B --count 2 --clips 8 [--heldout-bank artifacts/device_in/heldout_bank.npz]

`--drift` prints the colour drift of the streaming decode instead: the mean absolute error (0-255) of each
clip of the VAE round trip through one `StreamingDecoder` (as served), next to each clip decoded by a fresh
decoder primed with the reference (`drift_ratio`: the worst streamed clip over the first).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from model.config import load_config
from model.pipeline import AvatarModels, StreamingAvatar, image_to_tensor, video_to_frames
from model.vae import TIME_STRIDE, AvatarVAE
from training.lip_sync_check import LipSyncReport, generate_frames, heldout_samples, score_video
from training.talking_dataset import TalkingSample
from training.vae_training import to_video_tensor


@torch.inference_mode()
def vae_round_trip(vae: AvatarVAE, sample: TalkingSample, frames_per_clip: int) -> np.ndarray:
    """True frames -> causal encode (reference first) -> streaming decode clip by clip -> uint8 frames."""
    usable = len(sample.frames) // frames_per_clip * frames_per_clip
    video = to_video_tensor(np.concatenate([sample.reference[None], sample.frames[:usable]])[None], vae.device)
    moments = vae.vae._encode(video.to(vae.dtype))
    latents = vae.normalize(moments[:, : vae.latent_channels])
    ref_latent = vae.encode_reference(image_to_tensor(sample.reference))
    decoder = vae.new_decoder(ref_latent)
    per_clip = frames_per_clip // TIME_STRIDE
    clips = [decoder.decode(latents[:, :, 1 + k: 1 + k + per_clip]) for k in range(0, latents.shape[2] - 1, per_clip)]
    return video_to_frames(torch.cat(clips, dim=2))


def clip_errors(frames: np.ndarray, truth: np.ndarray, frames_per_clip: int) -> list[float]:
    """Mean absolute error (0-255) of each whole clip of `frames` against `truth`."""
    count = min(len(frames), len(truth)) // frames_per_clip * frames_per_clip
    diff = np.abs(frames[:count].astype(np.float32) - truth[:count].astype(np.float32))
    return [round(float(diff[k:k + frames_per_clip].mean()), 2) for k in range(0, count, frames_per_clip)]


@torch.inference_mode()
def fresh_decoder_round_trip(vae: AvatarVAE, sample: TalkingSample, frames_per_clip: int) -> np.ndarray:
    """Each clip encoded after the reference and decoded by its own new decoder (the single-clip case)."""
    ref_latent = vae.encode_reference(image_to_tensor(sample.reference))
    clips = []
    for start in range(0, len(sample.frames) // frames_per_clip * frames_per_clip, frames_per_clip):
        video = to_video_tensor(np.concatenate([sample.reference[None], sample.frames[start:start + frames_per_clip]])
                                [None], vae.device)
        latents = vae.normalize(vae.vae._encode(video.to(vae.dtype))[:, : vae.latent_channels])
        clips.append(vae.new_decoder(ref_latent).decode(latents[:, :, 1:]))
    return video_to_frames(torch.cat(clips, dim=2))


def streaming_drift(vae: AvatarVAE, sample: TalkingSample, frames_per_clip: int) -> dict:
    """Per-clip error of the served decode (one StreamingDecoder across clips) and of fresh decoders per clip."""
    streamed = clip_errors(vae_round_trip(vae, sample, frames_per_clip), sample.frames, frames_per_clip)
    fresh = clip_errors(fresh_decoder_round_trip(vae, sample, frames_per_clip), sample.frames, frames_per_clip)
    return {"streamed": streamed, "fresh": fresh, "drift_ratio": round(max(streamed) / max(streamed[0], 1e-6), 2),
            "worst": max(streamed)}


def drift(bundle: str, count: int, clips: int, heldout_bank: str | None = None, threads: int = 2) -> list[dict]:
    """`streaming_drift` of a bundle's VAE on the first `count` held-out samples, `clips` clips each."""
    torch.set_num_threads(threads)
    cfg = load_config(None, {"model.checkpoint": bundle})
    vae = AvatarModels.load(cfg).vae
    rows = []
    for index, sample in enumerate(heldout_samples(cfg, count, heldout_bank, clips)):
        rows.append({"sample": index, "clips": len(sample.frames) // cfg.video.infer_frames,
                     **streaming_drift(vae, sample, cfg.video.infer_frames)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def row(name: str, report: LipSyncReport) -> dict:
    by_lag = report.lip_sync.correlation_by_lag
    return {"what": name, "corr0": round(report.lip_sync.correlation_at_zero, 3),
            "best_near0": round(max(by_lag[lag] for lag in (-1, 0, 1)), 3),
            "best_lag": report.lip_sync.best_lag_frames, "best_corr": round(report.lip_sync.best_correlation, 3),
            "psnr_db": round(report.identity.psnr_db, 2), "ssim": round(report.identity.ssim, 3),
            "mean_opening": round(report.mean_opening, 3)}


def diagnose(bundle: str, count: int, full: bool, threads: int = 2) -> list[dict]:
    """Rows of (ground truth, VAE round trip[, full model]) per held-out sample."""
    torch.set_num_threads(threads)
    cfg = load_config(None, {"model.checkpoint": bundle})
    models = AvatarModels.load(cfg)
    avatar = StreamingAvatar(models, cfg) if full else None
    rows = []
    for index, sample in enumerate(heldout_samples(cfg, count)):
        truth = (sample.opening, sample.mouth_box, sample.reference)
        rows.append({"sample": index, **row("truth", score_video(sample.frames, *truth))})
        recon = vae_round_trip(models.vae, sample, cfg.video.infer_frames)
        rows.append({"sample": index, **row("vae", score_video(recon, *truth))})
        if avatar is not None:
            frames = generate_frames(avatar, sample.reference, sample.audio, cfg.server.prompt)
            rows.append({"sample": index, **row("model", score_video(frames, *truth))})
        for r in rows[-3:]:
            if r["sample"] == index:
                print(json.dumps(r), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Lip sync of the truth, the VAE round trip and the model.")
    p.add_argument("--bundle", default="model/assets/tiny_avatar.safetensors")
    p.add_argument("--count", type=int, default=2)
    p.add_argument("--full", action="store_true", help="also run the whole model (slow on the CPU)")
    p.add_argument("--drift", action="store_true", help="per-clip error of the streaming VAE decode instead")
    p.add_argument("--clips", type=int, default=8, help="with --drift: clips per sample (fewer if it is shorter)")
    p.add_argument("--heldout-bank", default=None, help="saved held-out speech (machines without espeak-ng)")
    args = p.parse_args(argv)
    if args.drift:
        drift(args.bundle, args.count, args.clips, args.heldout_bank)
        return 0
    diagnose(args.bundle, args.count, args.full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
