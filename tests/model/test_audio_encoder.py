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


# ----------------------------------------------------------------------------- whole file (offline) and look-ahead

CLIP = 12000  # the tiny preset's clip: 12 frames at 16 fps


def _windows(pcm: np.ndarray, lookahead: int = 0) -> list[AudioWindow]:
    from model.stream.windowing import ClipWindower

    windower = ClipWindower(CLIP, SR, SR, lookahead_samples=lookahead)
    return windower.push(pcm) + windower.flush()


def test_whole_file_features_are_one_pass_over_the_file_normalised_once(encoder):
    from model.encoders.audio import WholeFileFeatures

    pcm = speech_like(5 * CLIP + 3000, 7)
    whole = WholeFileFeatures(encoder, pcm, CLIP)
    assert whole.pieces == 1
    normalised = (pcm - pcm.mean()) / np.sqrt(pcm.var() + 1e-7)
    with torch.inference_mode():
        out = encoder.model(torch.from_numpy(normalised)[None], output_hidden_states=True)
    hidden = torch.stack(out.hidden_states, dim=2)[0]
    windows = _windows(pcm)
    assert len(windows) == 6
    for w in windows:  # each clip's frames are rows of that one pass, at the frames' times in the file
        got = whole.encode_window(w, 16.0, 12)
        torch.testing.assert_close(got, sample_rows(hidden, frame_feature_positions(w.t0, 16.0, 12)))
    # the window path hears 1 s before each clip and normalises each window on its own: other features
    assert not torch.allclose(encoder.encode_window(windows[2], 16.0, 12), whole.encode_window(windows[2], 16.0, 12),
                              atol=1e-3)


def test_a_long_file_is_encoded_in_pieces_with_margins_close_to_one_pass(encoder):
    from model.encoders.audio import WholeFileFeatures

    pcm = speech_like(40 * CLIP, 8)  # 30 s
    one = WholeFileFeatures(encoder, pcm, CLIP)
    pieces = WholeFileFeatures(encoder, pcm, CLIP, max_piece_s=9.0)  # 12 clips a piece, 10 s margins
    assert pieces.pieces == 4 and pieces.piece_samples == 12 * CLIP
    for w in _windows(pcm)[:40]:
        want = one.encode_window(w, 16.0, 12)
        got = pieces.encode_window(w, 16.0, 12)
        assert pieces._piece[0] == w.clip_index // 12  # one piece held at a time, made when first asked for
        assert ((got - want).norm() / want.norm()) < 1e-2


def test_lookahead_brings_window_features_nearer_the_whole_file_ones_at_the_clip_end():
    """The shipped tiny wav2vec2 on espeak-ng speech (BENCHMARKS.md has the table for 0-640 ms)."""
    from transformers import Wav2Vec2Model

    from model.encoders.audio import WholeFileFeatures, wav2vec2_config
    from model.weights.checkpoint import load_bundle
    from training.speech import synthesize

    cfg = load_config(None)
    model = Wav2Vec2Model(wav2vec2_config(cfg.model.audio_encoder))
    load_bundle("model/assets/tiny_avatar.safetensors", audio_encoder=model)
    trained = AudioEncoder(model, SR)
    said = synthesize("Could you tell me where the nearest train station is? I think I have lost my way.", "en-us")
    pcm = said[: len(said) // CLIP * CLIP]
    whole = WholeFileFeatures(trained, pcm, CLIP)
    errors = {}
    for lookahead in (0, 5120):  # 320 ms
        windows = [w for w in _windows(pcm, lookahead) if w.t0 * SR < len(pcm)]
        assert all(len(w.new_samples) == CLIP and w.lookahead == lookahead for w in windows)
        last = []
        for w in windows:
            live, ref = trained.encode_window(w, 16.0, 12), whole.encode_window(w, 16.0, 12)
            last.append(float((live[-3:] - ref[-3:]).norm() / ref[-3:].norm()))
        errors[lookahead] = np.mean(last)
    assert errors[5120] < 0.95 * errors[0], errors


def test_the_streaming_avatar_takes_lookahead_windows_and_cuts_the_clip_where_it_was():
    from model.stream.avatar import AvatarModels, StreamingAvatar

    cfg = load_config(None, {"model.checkpoint": None, "video.size": "64*64", "sampler.sample_steps": 1,
                             "model.audio_encoder.lookahead_s": 0.32})
    avatar = StreamingAvatar(AvatarModels.load(cfg), cfg)
    avatar.start(np.full((64, 64, 3), 128, np.uint8), "")
    try:
        (window,) = _windows(speech_like(CLIP + 5120, 9), lookahead=5120)[:1]
        clip = avatar.next_clip(window)
        assert clip.frames.shape == (12, 64, 64, 3) and clip.t0 == 0.0
        short = AudioWindow(window.samples[:-1], window.new_from, 0.0, 1, lookahead=5120)  # one sample short
        with pytest.raises(ValueError, match="11999 new samples"):
            avatar.next_clip(short)
    finally:
        avatar.close()
