"""The varied training data: faces anywhere in the frame with the mouth in its box, the drawn default face talking,
photographs that stay unchanged, voices split train/held-out, the browser's Opus round trip, a compact speech bank."""
from __future__ import annotations

import numpy as np

from evaluation.metrics import mouth_opening
from server.reference_image import drawn_mouth_box, drawn_reference
from training.mouth_motion import mouth_track
from training.speech import TRAIN_SENTENCES, load_speech_bank, save_speech_bank
from training.synthetic_faces import FacePose, mouth_box, render_frame, sample_varied_identity
from training.talking_dataset import render_drawn_sample, render_still_sample, varied_heldout_identities
from training.voices import HELDOUT_VOICES, TRAIN_VOICES, make_varied_utterance, opus_round_trip

SIZE = 64


def test_varied_faces_keep_the_mouth_in_its_box_wherever_they_sit():
    for seed in range(12):
        identity = sample_varied_identity(seed)
        x0, y0, x1, y1 = mouth_box(identity, SIZE)
        assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
        closed = render_frame(identity, FacePose(), SIZE).astype(np.int16)
        opened = render_frame(identity, FacePose(opening=1.0), SIZE).astype(np.int16)
        changed = np.abs(opened - closed).sum(axis=2) > 0
        inside = changed[y0:y1, x0:x1].sum()
        assert inside > 0 and changed.sum() == inside, f"seed {seed}: the open mouth leaves its box"
    looks = {(i.center_x, i.scale, i.glasses is not None) for i in (sample_varied_identity(s) for s in range(12))}
    assert len(looks) == 12


def test_heldout_varied_faces_are_not_training_seeds():
    names = {i.name for i in varied_heldout_identities(3)}
    assert len(names) == 3 and all(n.startswith("heldout-varied") for n in names)


def test_drawn_default_face_talks_inside_its_box_and_is_unchanged_closed():
    assert np.array_equal(drawn_reference(96, 96), drawn_reference(96, 96, 0.0))
    utterance = make_varied_utterance(3, TRAIN_SENTENCES, ("espeak:en-us+m3",), opus_share=0.0)
    sample = render_drawn_sample(utterance, SIZE, 16.0)
    measured = mouth_opening(sample.frames, drawn_mouth_box(SIZE, SIZE))
    assert np.corrcoef(measured, sample.opening)[0, 1] > 0.9


def test_a_photograph_stream_is_the_photo_unchanged_whatever_is_said():
    photo = np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)
    utterance = make_varied_utterance(4, TRAIN_SENTENCES, ("espeak:en-gb+f2",), opus_share=0.0)
    sample = render_still_sample(photo, utterance, SIZE, 16.0)
    assert len(sample.frames) == len(mouth_track(utterance.clean, utterance.sample_rate_hz, 16.0))
    assert (sample.frames == sample.reference[None]).all() and sample.mouth_box == (0, 0, 0, 0)


def test_train_and_heldout_voices_are_disjoint_and_use_two_synthesizers():
    assert not set(TRAIN_VOICES) & set(HELDOUT_VOICES)
    assert {v.split(":")[0] for v in TRAIN_VOICES} == {"espeak", "flite"}


def test_opus_round_trip_keeps_the_speech_in_place():
    rate = 16000
    t = np.arange(rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (t > 0.3)).astype(np.float32)
    back = opus_round_trip(tone, rate, 24000)
    assert len(back) == len(tone)
    assert np.corrcoef(tone[2000:-2000], back[2000:-2000])[0, 1] > 0.95  # aligned: no codec delay left


def test_speech_bank_keeps_what_the_model_hears(tmp_path):
    utterances = [make_varied_utterance(seed, TRAIN_SENTENCES, ("espeak:en-us+f3",)) for seed in (1, 2)]
    save_speech_bank(str(tmp_path / "bank.npz"), utterances, keep_heard=True)
    loaded = load_speech_bank(str(tmp_path / "bank.npz"))
    for before, after in zip(utterances, loaded, strict=True):
        for a, b in ((before.samples, after.samples), (before.clean, after.clean)):
            snr_db = 10 * np.log10((a**2).sum() / max(((a - b) ** 2).sum(), 1e-12))
            assert snr_db > 30
        assert after.voice == before.voice
