"""wav2vec2 audio features: one row per new video frame, every layer kept, aligned to frame times."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import load_config
from model.encoders.audio import AudioEncoder, frame_feature_positions, sample_rows
from model.io_types import AudioWindow

SR = 16000


@pytest.fixture(scope="module")
def encoder() -> AudioEncoder:
    torch.manual_seed(0)
    return AudioEncoder.build(load_config(None).model.audio_encoder)


def speech_like(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(n)
            ).astype(np.float32)


def test_features_have_one_row_per_frame_and_every_layer(encoder):
    window = AudioWindow(speech_like(16000 + 12000, 0), new_from=16000, t0=0.0, clip_index=0)
    features = encoder.encode_window(window, fps=16.0, num_frames=12)
    # tiny config: 2 transformer layers + the embedding output, hidden 64
    assert features.shape == (12, 3, 64)
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()


def test_frame_k_reads_the_audio_at_context_plus_k_over_fps():
    positions = frame_feature_positions(window_start_s=1.0, fps=16.0, num_frames=12)
    assert positions[0] == pytest.approx(50.0)  # 1 s of context at 50 rows per second
    np.testing.assert_allclose(np.diff(positions), 50.0 / 16.0)


def test_sample_rows_interpolates_linearly_and_clamps_at_the_end():
    hidden = torch.arange(5, dtype=torch.float32).view(5, 1, 1).expand(5, 2, 3)
    rows = sample_rows(hidden, np.array([0.0, 1.5, 3.25, 9.0]))
    torch.testing.assert_close(rows[:, 0, 0], torch.tensor([0.0, 1.5, 3.25, 4.0]))


def test_changing_the_new_audio_changes_the_features(encoder):
    context = speech_like(16000, 1)
    a = AudioWindow(np.concatenate([context, speech_like(12000, 2)]), 16000, 0.0, 0)
    b = AudioWindow(np.concatenate([context, np.zeros(12000, np.float32)]), 16000, 0.0, 0)
    fa = encoder.encode_window(a, 16.0, 12)
    fb = encoder.encode_window(b, 16.0, 12)
    assert not torch.allclose(fa[:, -1], fb[:, -1])


def test_same_window_gives_the_same_features(encoder):
    window = AudioWindow(speech_like(28000, 3), 16000, 0.0, 0)
    torch.testing.assert_close(encoder.encode_window(window, 16.0, 12), encoder.encode_window(window, 16.0, 12))


def test_window_shorter_than_the_receptive_field_is_refused(encoder):
    with pytest.raises(ValueError, match="receptive field"):
        encoder.encode_window(AudioWindow(np.zeros(100, np.float32), 0, 0.0, 0), 16.0, 1)


def test_missing_checkpoint_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        AudioEncoder.from_folder(tmp_path, load_config(None).model.audio_encoder)


def test_a_saved_wav2vec2_folder_loads_back_bit_exact(tmp_path, encoder):
    encoder.model.save_pretrained(tmp_path)
    loaded = AudioEncoder.from_folder(tmp_path, load_config(None).model.audio_encoder)
    for (name, a), (_, b) in zip(encoder.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
