"""Clips join: with the trained tiny avatar, the last frame of clip n is closer to the first frame of clip n+1
than to the first frame of clip n+1 of another session (an artificial cut), and about as close as two
neighbouring frames inside a clip."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from model.config import REPO_ROOT, load_config
from model.stream.avatar import AvatarModels, StreamingAvatar
from model.stream.windowing import ClipWindower
from offline.render import read_speech

TRAINED = REPO_ROOT / "model" / "assets" / "tiny_avatar.safetensors"
NUM_CLIPS = 4


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[int, list[np.ndarray]]:
    """The same speech and face rendered by two sessions that differ only in their seed."""
    torch.set_num_threads(1)
    cfg = load_config(None, {"model.checkpoint": str(TRAINED)})
    models = AvatarModels.load(cfg)
    wav = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "The quick brown fox jumps over the lazy dog, again and again."],
                   check=True)
    pcm = read_speech(wav, cfg.audio_sample_rate_hz).model_pcm
    yy, xx = np.mgrid[0:128, 0:128]
    face = np.stack([xx * 2, yy * 2, 255 - xx], axis=-1).astype(np.uint8)
    face[(yy - 64) ** 2 + (xx - 64) ** 2 < 900] = (220, 180, 150)
    videos = {}
    for seed in (1, 2):
        avatar = StreamingAvatar(models, cfg, seed=seed)
        avatar.start(face, "A person talking to the camera.")
        windower = ClipWindower(avatar.clip_samples, avatar.context_samples, avatar.sample_rate_hz)
        windows = windower.push(np.resize(pcm, NUM_CLIPS * avatar.clip_samples))
        videos[seed] = [avatar.next_clip(w).frames.astype(np.float32) for w in windows]
    return videos


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_consecutive_clips_join_closer_than_across_a_cut(rendered):
    video, other = rendered[1], rendered[2]
    joins = [mean_abs(video[n][-1], video[n + 1][0]) for n in range(NUM_CLIPS - 1)]
    cuts = [mean_abs(video[n][-1], other[n + 1][0]) for n in range(NUM_CLIPS - 1)]
    # The avatar copies everything but the mouth from its reference, so another seed's frame differs from this
    # session's mainly at the mouth (joins ~2.1 vs cuts ~2.2 grey levels with the bundle trained under the
    # reference scheme; 0.9x held for the earlier, blurrier bundle): a join must still be the closer one.
    assert np.mean(joins) < np.mean(cuts), f"joins {joins} vs cuts {cuts}"


def test_once_settled_a_join_is_like_a_step_inside_a_clip(rendered):
    video = rendered[1]
    later_joins = [mean_abs(video[n][-1], video[n + 1][0]) for n in range(1, NUM_CLIPS - 1)]
    inside = [mean_abs(clip[i], clip[i + 1]) for clip in video[1:] for i in range(len(clip) - 1)]
    assert np.mean(later_joins) < 2.0 * np.mean(inside), f"joins {later_joins} vs steps inside {np.mean(inside)}"
