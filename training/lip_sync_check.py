"""Lip sync of a model on held-out speakers: generate through the streaming avatar, measure, summarise.

The server's live-path test and the offline test both call `score_video` on the frames they got back,
so every path is judged by the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.config import AppConfig
from model.metrics import IdentityScore, LipSyncScore, identity_similarity, lip_sync, mouth_opening
from model.windowing import ClipWindower
from training.talking_dataset import TalkingSample, make_sample


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


def heldout_samples(cfg: AppConfig, count: int) -> list[TalkingSample]:
    """The first `count` held-out samples at the model's frame size and fps."""
    return [make_sample("heldout", i, cfg.video.width, cfg.video.fps, cfg.audio_sample_rate_hz) for i in range(count)]


def heldout_reports(avatar, cfg: AppConfig, count: int, prompt: str | None = None) -> list[LipSyncReport]:
    """Generate and score the first `count` held-out samples."""
    reports = []
    for sample in heldout_samples(cfg, count):
        frames = generate_frames(avatar, sample.reference, sample.audio, prompt or cfg.server.prompt)
        reports.append(score_video(frames, sample.opening, sample.mouth_box, sample.reference))
    return reports
