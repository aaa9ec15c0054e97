"""The embedded tiny avatar: its checkpoint loads as the default, and silence keeps its mouth closed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import REPO_ROOT, load_config
from model.metrics import mouth_opening
from model.pipeline import AvatarModels, StreamingAvatar
from training.lip_sync_check import generate_frames, score_video
from training.speech import silence
from training.synthetic_faces import FacePose, render_frame
from training.talking_dataset import make_sample

CHECKPOINT = REPO_ROOT / "model" / "assets" / "tiny_avatar.safetensors"


@pytest.fixture(scope="module")
def cfg():
    torch.set_num_threads(2)
    return load_config(None)


def test_default_config_uses_the_embedded_checkpoint_and_it_loads(cfg):
    assert Path(cfg.model.checkpoint).resolve() == CHECKPOINT
    assert CHECKPOINT.stat().st_size <= 20_000_000
    models = AvatarModels.load(cfg)
    trained = models.vae.vae.quant_conv.weight
    torch.manual_seed(cfg.runtime.seed)
    assert not torch.equal(trained, torch.nn.Conv3d(32, 32, 1).weight)


def test_silence_keeps_the_mouth_closed(cfg):
    sample = make_sample("heldout", 1, cfg.video.width, cfg.video.fps, cfg.audio_sample_rate_hz)
    quiet = silence(3.0, seed=4, sample_rate_hz=cfg.audio_sample_rate_hz)
    avatar = StreamingAvatar(AvatarModels.load(cfg), cfg)
    frames = generate_frames(avatar, sample.reference, quiet.samples)
    report = score_video(frames, np.zeros(len(frames)), sample.mouth_box, sample.reference)
    # what the measure reads for a mouth a fifth open, drawn by the generator for this identity
    slightly_open = render_frame(sample.identity, FacePose(opening=0.2), cfg.video.width)[None]
    threshold = float(mouth_opening(slightly_open, sample.mouth_box)[0])
    assert threshold > 0.05
    assert report.mean_opening < threshold, (report.mean_opening, threshold)
