"""The embedded avatar keeps its reference over a stream on a held-out face, voice and a photograph (CI length).

The short form of `make accept-tiny` (training/acceptance/test_long_stream.py: 2 minutes, 30 s windows): 32 s of
held-out speech (voices never used in training, through a room and Opus) on a held-out varied face, judged in
8 s windows, and 16 s on the astronaut photograph, which has no drawn mouth box and must come back unchanged.
Identity PSNR outside the mouth >= 22 dB in every window as served (`video.detail_restore`), the last window no
more than 1 dB below the first, the mouth following the voice >= 0.7 at lag 0 or +-1 frame; the model's own decode
is held to floors of its own.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from model.config import REPO_ROOT
from training.long_stream import evaluate_bundle, heldout_speech, judge, psnr_outside

CHECKPOINT = REPO_ROOT / "model" / "assets" / "tiny_avatar.safetensors"
ESPEAK_HELDOUT = ("espeak:en-gb-x-gbclan+Denis", "espeak:en-us+Mario")  # CI has espeak-ng, not flite


def test_psnr_and_drift_are_measured_per_window():
    """The judge itself: a reference shown unchanged, then fading, reads as high PSNR, then drift."""
    reference = np.full((16, 16, 3), 128, np.uint8)
    frames = np.repeat(reference[None], 64, axis=0).astype(np.int16)
    frames[32:] += 20  # the second half drifts by 20 grey levels
    speech = heldout_speech(2.0, voices=ESPEAK_HELDOUT)
    report = judge("photo", frames.clip(0, 255).astype(np.uint8), reference, None, speech, 16.0, [0.5] * 5, 0.75,
                   window_s=2.0)
    assert report.psnr_by_window_db[0] > 50 and report.psnr_by_window_db[-1] == pytest.approx(22.1, abs=0.1)
    assert report.drift_db > 20
    talking = reference.copy()
    talking[10:14, 4:12] = 0  # only the mouth box changed: as good as the reference itself outside it
    assert psnr_outside(talking[None], reference, (4, 10, 12, 14))[0] > 50
    assert psnr_outside(talking[None], reference, None)[0] < 25


# What the shipped bundle's own decode holds (BENCHMARKS.md, run 5): about 22 dB on the held-out face, 15 dB on the
# photograph (its VAE blurs a photo into blobs), flat over the stream; these floors catch a regression of the model.
# What the viewer sees (video.detail_restore, on in the tiny preset: the model's motion on the sharp reference) must
# reach the 22 dB target. Both come from one stream: the restore only reads the decoded frames.
BARE_FLOOR_DB = {"face": 20.5, "photo": 14.0}
TARGET_DB = 22.0


@pytest.fixture(scope="module")
def reports():
    return {subject: evaluate_bundle(CHECKPOINT, subject, seconds, window_s=8.0, voices=ESPEAK_HELDOUT,
                                     compare_restore=True)[0]
            for subject, seconds in (("face", 32.0), ("photo", 16.0))}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("subject", ["face", "photo"])
def test_identity_holds_without_drift_and_the_mouth_follows_a_heldout_voice(reports, subject):
    report = reports[subject]
    summary = {**report.summary(), "bare": report.bare.summary()}
    print(json.dumps(summary))
    assert min(report.psnr_by_window_db) >= TARGET_DB, summary
    assert report.drift_db <= 1.0 and report.bare.drift_db <= 1.0, summary
    assert min(report.bare.psnr_by_window_db) >= BARE_FLOOR_DB[subject], summary
    if subject == "face":
        assert report.lip_sync_best_near_zero >= 0.7 and report.bare.lip_sync_best_near_zero >= 0.7, summary
