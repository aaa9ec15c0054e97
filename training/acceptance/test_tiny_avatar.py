"""The trained tiny avatar's lip-sync target: its mouth follows held-out speech (>= 0.7 at lag 0 or +-1).

Lip sync is measured on the MP4 the offline CLI writes, for a speaker and sentences never seen in
training; the live WebRTC path reuses `training.lip_sync_check.score_video` on the frames it receives.
"""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from model.config import REPO_ROOT, load_config
from run_server import main as run_server_main
from training.lip_sync_check import score_video
from training.talking_dataset import make_sample, write_sample

CHECKPOINT = REPO_ROOT / "model" / "assets" / "tiny_avatar.safetensors"


@pytest.fixture(scope="module")
def cfg():
    torch.set_num_threads(2)
    return load_config(None)


def read_mp4_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_offline_cli_video_follows_heldout_speech(cfg, tmp_path):
    sample = make_sample("heldout", 0, cfg.video.width, cfg.video.fps, cfg.audio_sample_rate_hz)
    paths = write_sample(sample, tmp_path, "speaker")
    out = tmp_path / "out.mp4"
    code = run_server_main(["offline", "--audio", str(paths["audio"]), "--image", str(paths["reference"]),
                            "--out", str(out)])
    assert code == 0
    frames = read_mp4_frames(out)
    report = score_video(frames, sample.opening, sample.mouth_box, sample.reference)
    best_near_zero = max(report.lip_sync.correlation_by_lag[lag] for lag in (-1, 0, 1))
    assert best_near_zero >= 0.7, report
    assert abs(report.lip_sync.best_lag_frames) <= 1, report
    assert report.identity.psnr_db > 20, report
