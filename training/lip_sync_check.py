"""Lip sync of a model on held-out speakers: generate through the streaming avatar, measure, summarise.

The server's live-path test and the offline test both call `score_video` on the frames they got back,
so every path is judged by the same numbers.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from evaluation.metrics import IdentityScore, LipSyncScore, identity_similarity, lip_sync, mouth_opening
from model.config import AppConfig
from model.stream.windowing import ClipWindower
from training.speech import SAMPLE_RATE_HZ, Utterance, make_utterance
from training.talking_dataset import (
    TalkingSample,
    make_sample,
    render_sample,
    split_identities,
    split_sentences,
    utterance_seed,
)


@dataclass(frozen=True)
class LipSyncReport:
    """One generated video judged against its ground truth."""

    lip_sync: LipSyncScore
    identity: IdentityScore
    mean_opening: float  # measured, fraction of the mouth box height


def score_video(frames: np.ndarray, truth_opening: np.ndarray, mouth_box: tuple[int, int, int, int],
                reference: np.ndarray, max_lag_frames: int = 4) -> LipSyncReport:
    """Judge generated frames [T,H,W,3] against the true mouth opening per frame and the reference still."""
    count = min(len(frames), len(truth_opening))
    measured = mouth_opening(frames[:count], mouth_box)
    return LipSyncReport(lip_sync=lip_sync(measured, truth_opening[:count], max_lag_frames),
                         identity=identity_similarity(frames[:count], reference, mouth_box),
                         mean_opening=float(measured.mean()))


def generate_frames(avatar, reference: np.ndarray, audio: np.ndarray, prompt: str = "") -> np.ndarray:
    """Every frame a `StreamingAvatar` makes for `audio` (cut by the live windower, last clip padded)."""
    windower = ClipWindower(avatar.clip_samples, avatar.context_samples, avatar.sample_rate_hz)
    avatar.start(reference, prompt)
    try:
        clips = [avatar.next_clip(w).frames for w in windower.push(audio) + windower.flush()]
    finally:
        avatar.close()
    return np.concatenate(clips)


def save_heldout_bank(path: str | Path, count: int, sample_rate_hz: int = SAMPLE_RATE_HZ) -> Path:
    """The speech of the first `count` held-out samples, exactly (noisy mix and clean), for machines without espeak-ng."""
    utterances = [make_utterance(utterance_seed("heldout", i), sentences=split_sentences("heldout"),
                                 sample_rate_hz=sample_rate_hz) for i in range(count)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, sample_rate_hz=np.array(sample_rate_hz),
                        lengths=np.array([len(u.samples) for u in utterances]),
                        samples=np.concatenate([u.samples for u in utterances]),
                        clean=np.concatenate([u.clean for u in utterances]),
                        texts=np.array([u.text for u in utterances]), voices=np.array([u.voice for u in utterances]))
    return path


def _bank_sample(bank, index: int, size: int, fps: float) -> TalkingSample:
    """Held-out sample `index` as `make_sample` draws it, from saved speech (same identity, motion, audio)."""
    offsets = np.concatenate([[0], np.cumsum(bank["lengths"])])
    cut = slice(int(offsets[index]), int(offsets[index + 1]))
    utterance = Utterance(samples=bank["samples"][cut], clean=bank["clean"][cut],
                          sample_rate_hz=int(bank["sample_rate_hz"]), text=str(bank["texts"][index]),
                          voice=str(bank["voices"][index]))
    identities = split_identities("heldout")
    return render_sample(identities[index % len(identities)], utterance, motion_seed=utterance_seed("heldout", index),
                         size=size, fps=fps)


def heldout_samples(cfg: AppConfig, count: int, bank: str | Path | None = None,
                    max_clips: int | None = None) -> list[TalkingSample]:
    """The first `count` held-out samples at the model's frame size and fps (from `bank` when given),
    each cut to its first `max_clips` clips when given."""
    if bank is None:
        samples = [make_sample("heldout", i, cfg.video.width, cfg.video.fps, cfg.audio_sample_rate_hz)
                   for i in range(count)]
    else:
        with np.load(bank) as saved:
            saved = dict(saved)
        if count > len(saved["lengths"]):
            raise ValueError(f"held-out bank {bank} has {len(saved['lengths'])} samples, {count} asked")
        samples = [_bank_sample(saved, i, cfg.video.width, cfg.video.fps) for i in range(count)]
    if max_clips is not None:
        samples = [cut_sample(s, max_clips * cfg.video.infer_frames) for s in samples]
    return samples


def cut_sample(sample: TalkingSample, num_frames: int) -> TalkingSample:
    """The first `num_frames` frames of a sample, with their audio and ground truth."""
    num_frames = min(num_frames, len(sample.frames))
    samples = round(num_frames / sample.fps * sample.sample_rate_hz)
    return replace(sample, frames=sample.frames[:num_frames], audio=sample.audio[:samples],
                   opening=sample.opening[:num_frames], spread=sample.spread[:num_frames])


def heldout_reports(avatar, cfg: AppConfig, count: int, prompt: str | None = None,
                    max_clips: int | None = None) -> list[LipSyncReport]:
    """Generate and score the first `count` held-out samples (their first `max_clips` clips when given)."""
    reports = []
    for sample in heldout_samples(cfg, count, max_clips=max_clips):
        frames = generate_frames(avatar, sample.reference, sample.audio, prompt or cfg.server.prompt)
        reports.append(score_video(frames, sample.opening, sample.mouth_box, sample.reference))
    return reports


def main(argv: list[str] | None = None) -> int:
    """Score a bundle on held-out speech, or save that speech for a machine without espeak-ng."""
    from model.config import load_config
    from model.stream.avatar import AvatarModels, StreamingAvatar

    p = argparse.ArgumentParser(description="Held-out lip sync of a tiny-avatar bundle through StreamingAvatar.")
    p.add_argument("--bundle", default="model/assets/tiny_avatar.safetensors")
    p.add_argument("--count", type=int, default=2)
    p.add_argument("--max-clips", type=int, default=None)
    p.add_argument("--save-bank", default=None, help="write the held-out speech of --count samples here and stop")
    args = p.parse_args(argv)
    if args.save_bank:
        print(save_heldout_bank(args.save_bank, args.count))
        return 0
    cfg = load_config(None, {"model.checkpoint": args.bundle})
    avatar = StreamingAvatar(AvatarModels.load(cfg), cfg)
    for index, report in enumerate(heldout_reports(avatar, cfg, args.count, max_clips=args.max_clips)):
        by_lag = report.lip_sync.correlation_by_lag
        print(f"heldout {index}: corr lag0 {report.lip_sync.correlation_at_zero:.3f}, best of -1..1 "
              f"{max(by_lag[k] for k in (-1, 0, 1)):.3f}, best lag {report.lip_sync.best_lag_frames:+d} "
              f"({report.lip_sync.best_correlation:.3f}), identity PSNR {report.identity.psnr_db:.2f} dB, "
              f"SSIM {report.identity.ssim:.3f}, mean opening {report.mean_opening:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
