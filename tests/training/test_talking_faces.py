"""The synthetic talking-face data: deterministic, split cleanly, mouth driven by the voice and kept in its box."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import luma
from training.mouth_motion import frame_count, mouth_track
from training.speech import (
    HELDOUT_SENTENCES,
    SAMPLE_RATE_HZ,
    TRAIN_SENTENCES,
    load_speech_bank,
    make_utterance,
    save_speech_bank,
    silence,
    synthesize,
)
from training.synthetic_faces import FacePose, mouth_box, render_frame, sample_identity
from training.talking_dataset import make_sample, read_truth, split_identities, write_sample

SIZE = 64
FPS = 16.0


@pytest.fixture(scope="module")
def heldout_sample():
    return make_sample("heldout", 0, SIZE, FPS)


def test_same_index_gives_identical_sample(heldout_sample):
    again = make_sample("heldout", 0, SIZE, FPS)
    assert np.array_equal(again.frames, heldout_sample.frames)
    assert np.array_equal(again.audio, heldout_sample.audio)
    assert np.array_equal(again.opening, heldout_sample.opening)


def test_splits_share_no_identity_and_no_sentence():
    train = {(i.skin, i.hair, i.hair_style, i.eyes, i.background) for i in split_identities("train")}
    heldout = {(i.skin, i.hair, i.hair_style, i.eyes, i.background) for i in split_identities("heldout")}
    assert len(train) == len(split_identities("train"))
    assert not train & heldout
    assert not set(TRAIN_SENTENCES) & set(HELDOUT_SENTENCES)


def test_sample_lengths_agree_between_audio_video_and_truth(heldout_sample):
    s = heldout_sample
    assert s.frames.shape == (len(s.opening), SIZE, SIZE, 3) and s.frames.dtype == np.uint8
    assert len(s.audio) == round(len(s.frames) / FPS * SAMPLE_RATE_HZ)
    assert s.reference.shape == (SIZE, SIZE, 3)


def test_speech_is_16khz_and_deterministic():
    first = synthesize("Hello there.", "en-us")
    assert first.dtype == np.float32 and 0.3 * SAMPLE_RATE_HZ < len(first) < 2.0 * SAMPLE_RATE_HZ
    assert np.array_equal(first, synthesize("Hello there.", "en-us"))
    utterance = make_utterance(5)
    assert np.array_equal(utterance.samples, make_utterance(5).samples)
    assert not np.array_equal(utterance.samples, make_utterance(6).samples)


def test_mouth_opens_with_speech_and_stays_shut_in_silence(heldout_sample):
    quiet = silence(2.0)
    assert np.all(mouth_track(quiet.clean, SAMPLE_RATE_HZ, FPS).opening == 0.0)
    assert frame_count(len(quiet.clean), SAMPLE_RATE_HZ, FPS) == 32
    opening = heldout_sample.opening
    assert opening[:3].max() < 0.05  # every utterance starts with a pause
    assert opening.max() > 0.7 and (opening > 0.3).mean() > 0.3


def test_mouth_stays_inside_its_box_in_every_pose():
    for seed in range(6):
        identity = sample_identity(seed)
        x0, y0, x1, y1 = mouth_box(identity, SIZE)
        for dx, dy in [(-0.018, -0.018), (0.018, 0.018)]:
            closed = render_frame(identity, FacePose(dx=dx, dy=dy, opening=0.0, spread=1.0), SIZE)
            wide = render_frame(identity, FacePose(dx=dx, dy=dy, opening=1.0, spread=1.0), SIZE)
            changed = np.abs(luma(wide) - luma(closed)) > 0.02
            assert changed.any()
            outside = changed.copy()
            outside[y0:y1, x0:x1] = False
            assert not outside.any(), f"identity {seed} mouth leaves its box {mouth_box(identity, SIZE)}"


def test_files_on_disk_carry_the_ground_truth(heldout_sample, tmp_path):
    paths = write_sample(heldout_sample, tmp_path, "clip")
    truth = read_truth(paths["truth"])
    assert np.allclose(truth["mouth_opening"], heldout_sample.opening, atol=1e-4)
    assert truth["mouth_box"] == heldout_sample.mouth_box
    assert truth["num_frames"] == len(heldout_sample.frames)
    assert np.array_equal(np.load(paths["frames"])["frames"], heldout_sample.frames)


def test_speech_bank_round_trip_keeps_the_speech(tmp_path):
    utterances = [make_utterance(1), make_utterance(2)]
    save_speech_bank(str(tmp_path / "bank.npz"), utterances)
    loaded = load_speech_bank(str(tmp_path / "bank.npz"))
    assert [u.text for u in loaded] == [u.text for u in utterances]
    for original, restored in zip(utterances, loaded):
        assert np.abs(original.clean - restored.clean).max() < 1e-4
        assert np.isclose(np.std(restored.samples - restored.clean), np.std(original.samples - original.clean),
                          rtol=0.05)
