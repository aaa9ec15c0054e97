"""Where lip sync is lost: the ground truth itself, the VAE round trip, and the whole model, on held-out samples.

    python -m training.diagnose --bundle model/assets/tiny_avatar.safetensors --count 2 [--full]

The VAE row encodes the true frames (reference first, as training does) and decodes them through the
server's `StreamingDecoder`, clip by clip: if that row already loses the mouth, no DiT can bring it back.
`--full` adds the whole model through `StreamingAvatar` (slow on the CPU: about 1-2 frames/s).

    python -m training.diagnose --drift --bundle B --count 2 --clips 8 [--heldout-bank artifacts/device_in/heldout_bank.npz]

`--drift` prints the colour drift of the streaming decode instead: the mean absolute error (0-255) of each
clip of the VAE round trip through one `StreamingDecoder` on one continuous cache (`streamed`), through the
bounded-context decoder as served (`bounded`: model.vae.stream_* of configs/tiny.yaml, changed with e.g.
`--set model.vae.stream_context_frames=2`) when its context is > 0, and each clip decoded by a fresh decoder
primed as a session is (`stream.decoder_prime`: the still video's first 7 latents) (`fresh`); `drift_ratio` is the worst clip over the first. `jump` says whether the
video continues across clips: the mean absolute difference (0-255) from the last frame of each clip to the
first of the next (`clip_start`), the same between neighbouring frames inside a clip (`inside`), and the
largest step between two neighbouring frames anywhere (`max`); `truth_jump` is that of the true frames.
`decode_ms_per_clip` is the decoder's mean time per clip on this machine (`--threads`).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from model.config import StreamConfig, load_config, set_overrides
from model.stream.avatar import AvatarModels, StreamingAvatar, image_to_tensor, video_to_frames
from model.stream.scheme import motion_start
from model.vae.streaming import TIME_STRIDE, AvatarVAE
from training.lip_sync_check import LipSyncReport, generate_frames, heldout_samples, score_video
from training.talking_dataset import TalkingSample
from training.vae_training import to_video_tensor


@torch.inference_mode()
def served_prime(vae: AvatarVAE, reference: np.ndarray, stream: StreamConfig | None = None) -> torch.Tensor:
    """The latents a session primes its decoder with for `reference` (`stream.decoder_prime`; default: the
    reference scheme's first 7 latents of the still video)."""
    image = image_to_tensor(reference).to(vae.device)
    ref_latent = vae.encode_reference(image)
    return motion_start(stream or StreamConfig(), vae, image.to(vae.dtype), ref_latent).decoder_prime


@torch.inference_mode()
def vae_round_trip(vae: AvatarVAE, sample: TalkingSample, frames_per_clip: int, context_frames: int | None = None,
                   restart_frames: int | None = None, timings: list[float] | None = None,
                   stream: StreamConfig | None = None) -> np.ndarray:
    """True frames -> causal encode (reference first) -> streaming decode clip by clip -> uint8 frames.

    The decoder is the served one (primed as `stream` says, the VAE's `apply_stream` settings) unless
    `context_frames`/`restart_frames` say otherwise; each clip's decode time (s) is appended to `timings`."""
    usable = len(sample.frames) // frames_per_clip * frames_per_clip
    video = to_video_tensor(np.concatenate([sample.reference[None], sample.frames[:usable]])[None], vae.device)
    moments = vae.vae._encode(video.to(vae.dtype))
    latents = vae.normalize(moments[:, : vae.latent_channels])
    decoder = vae.new_decoder(served_prime(vae, sample.reference, stream), context_frames, restart_frames)
    per_clip = frames_per_clip // TIME_STRIDE
    clips = []
    for k in range(0, latents.shape[2] - 1, per_clip):
        start = time.perf_counter()
        clips.append(decoder.decode(latents[:, :, 1 + k: 1 + k + per_clip]))
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return video_to_frames(torch.cat(clips, dim=2))


def clip_errors(frames: np.ndarray, truth: np.ndarray, frames_per_clip: int) -> list[float]:
    """Mean absolute error (0-255) of each whole clip of `frames` against `truth`."""
    count = min(len(frames), len(truth)) // frames_per_clip * frames_per_clip
    diff = np.abs(frames[:count].astype(np.float32) - truth[:count].astype(np.float32))
    return [round(float(diff[k:k + frames_per_clip].mean()), 2) for k in range(0, count, frames_per_clip)]


@torch.inference_mode()
def fresh_decoder_round_trip(vae: AvatarVAE, sample: TalkingSample, frames_per_clip: int,
                             stream: StreamConfig | None = None) -> np.ndarray:
    """Each clip encoded after the reference and decoded by its own new decoder, primed as served."""
    prime = served_prime(vae, sample.reference, stream)
    clips = []
    for start in range(0, len(sample.frames) // frames_per_clip * frames_per_clip, frames_per_clip):
        video = to_video_tensor(np.concatenate([sample.reference[None], sample.frames[start:start + frames_per_clip]])
                                [None], vae.device)
        latents = vae.normalize(vae.vae._encode(video.to(vae.dtype))[:, : vae.latent_channels])
        clips.append(vae.new_decoder(prime, context_frames=0).decode(latents[:, :, 1:]))
    return video_to_frames(torch.cat(clips, dim=2))


def frame_jumps(frames: np.ndarray, frames_per_clip: int) -> dict:
    """Mean absolute difference (0-255) between consecutive frames: across each clip boundary, inside clips, largest."""
    diffs = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # diffs[i]: frame i -> i + 1
    at_start = np.arange(len(diffs)) % frames_per_clip == frames_per_clip - 1
    return {"clip_start": round(float(diffs[at_start].mean()), 2) if at_start.any() else None,
            "inside": round(float(diffs[~at_start].mean()), 2), "max": round(float(diffs.max()), 2)}


def _decode_row(vae: AvatarVAE, sample: TalkingSample, frames_per_clip: int, context_frames: int | None,
                restart_frames: int | None, stream: StreamConfig | None) -> dict:
    """Errors, drift ratio, frame steps and decode time of one round trip (None: the VAE's own settings)."""
    timings: list[float] = []
    frames = vae_round_trip(vae, sample, frames_per_clip, context_frames, restart_frames, timings, stream)
    errors = clip_errors(frames, sample.frames, frames_per_clip)
    return {"errors": errors, "drift_ratio": round(max(errors) / max(errors[0], 1e-6), 2), "worst": max(errors),
            "jump": frame_jumps(frames, frames_per_clip),
            "decode_ms_per_clip": round(1000 * float(np.mean(timings)), 1)}


def streaming_drift(vae: AvatarVAE, sample: TalkingSample, frames_per_clip: int,
                    stream: StreamConfig | None = None) -> dict:
    """Per-clip error of one StreamingDecoder on a continuous cache (`streamed`), of the bounded-context decoder
    (`bounded`, the VAE's `apply_stream` settings, when its context is > 0) and of fresh decoders per clip, each
    primed as a session under `stream` primes it."""
    continuous = _decode_row(vae, sample, frames_per_clip, 0, None, stream)
    fresh = clip_errors(fresh_decoder_round_trip(vae, sample, frames_per_clip, stream), sample.frames,
                        frames_per_clip)
    result = {"streamed": continuous.pop("errors"), "fresh": fresh, **continuous}
    if vae.stream_context_frames > 0:
        result["bounded"] = {"context_frames": vae.stream_context_frames, "restart_frames": vae.stream_restart_frames,
                             "crossfade": vae.stream_crossfade,
                             **_decode_row(vae, sample, frames_per_clip, None, None, stream)}
    result["truth_jump"] = frame_jumps(sample.frames, frames_per_clip)
    return result


def drift(bundle: str, count: int, clips: int, heldout_bank: str | None = None, threads: int = 2,
          overrides: dict | None = None) -> list[dict]:
    """`streaming_drift` of a bundle's VAE on the first `count` held-out samples, `clips` clips each
    (the bounded decoder as configured: tiny.yaml with `overrides`)."""
    torch.set_num_threads(threads)
    cfg = load_config(None, {**(overrides or {}), "model.checkpoint": bundle})
    vae = AvatarModels.load(cfg).vae
    rows = []
    for index, sample in enumerate(heldout_samples(cfg, count, heldout_bank, clips)):
        rows.append({"sample": index, "clips": len(sample.frames) // cfg.video.infer_frames,
                     **streaming_drift(vae, sample, cfg.video.infer_frames, cfg.stream)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def row(name: str, report: LipSyncReport) -> dict:
    by_lag = report.lip_sync.correlation_by_lag
    return {"what": name, "corr0": round(report.lip_sync.correlation_at_zero, 3),
            "best_near0": round(max(by_lag[lag] for lag in (-1, 0, 1)), 3),
            "best_lag": report.lip_sync.best_lag_frames, "best_corr": round(report.lip_sync.best_correlation, 3),
            "psnr_db": round(report.identity.psnr_db, 2), "ssim": round(report.identity.ssim, 3),
            "mean_opening": round(report.mean_opening, 3)}


def diagnose(bundle: str, count: int, full: bool, threads: int = 2, overrides: dict | None = None) -> list[dict]:
    """Rows of (ground truth, VAE round trip[, full model]) per held-out sample."""
    torch.set_num_threads(threads)
    cfg = load_config(None, {**(overrides or {}), "model.checkpoint": bundle})
    models = AvatarModels.load(cfg)
    avatar = StreamingAvatar(models, cfg) if full else None
    rows = []
    for index, sample in enumerate(heldout_samples(cfg, count)):
        truth = (sample.opening, sample.mouth_box, sample.reference)
        rows.append({"sample": index, **row("truth", score_video(sample.frames, *truth))})
        recon = vae_round_trip(models.vae, sample, cfg.video.infer_frames, stream=cfg.stream)
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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set model.vae.stream_context_frames=2 (repeatable)")
    args = p.parse_args(argv)
    overrides = set_overrides(args.overrides)
    if args.drift:
        drift(args.bundle, args.count, args.clips, args.heldout_bank, args.threads, overrides)
        return 0
    diagnose(args.bundle, args.count, args.full, args.threads, overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
