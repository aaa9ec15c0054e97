"""Where lip sync is lost: the ground truth itself, the VAE round trip, and the whole model, on held-out samples.

    python -m training.diagnose --bundle model/assets/tiny_avatar.safetensors --count 2 [--full]

The VAE row encodes the true frames (reference first, as training does) and decodes them through the
server's `StreamingDecoder`, clip by clip: if that row already loses the mouth, no DiT can bring it back.
`--full` adds the whole model through `StreamingAvatar` (slow on the CPU: about 1-2 frames/s).
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
    args = p.parse_args(argv)
    diagnose(args.bundle, args.count, args.full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
