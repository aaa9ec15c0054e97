"""The lip-sync and identity measures, proven on the generator's own ground-truth video."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import identity_similarity, lip_sync, mouth_opening
from training.talking_dataset import make_sample

SIZE = 96
FPS = 16.0


@pytest.fixture(scope="module")
def sample():
    return make_sample("heldout", 1, SIZE, FPS)


def _delay(series: np.ndarray, frames: int) -> np.ndarray:
    """The series as a video that is `frames` late (early when negative), edges held."""
    if frames >= 0:
        return np.concatenate([np.repeat(series[:1], frames), series[: len(series) - frames]])
    return np.concatenate([series[-frames:], np.repeat(series[-1:], -frames)])


def test_ground_truth_video_correlates_perfectly_at_lag_zero(sample):
    measured = mouth_opening(sample.frames, sample.mouth_box)
    score = lip_sync(measured, sample.opening, max_lag_frames=4)
    assert score.correlation_at_zero > 0.99
    assert score.best_lag_frames == 0
    assert set(score.correlation_by_lag) == set(range(-4, 5))


@pytest.mark.parametrize("shift_frames", [2, -3, 1])
def test_shifted_video_reports_its_shift(sample, shift_frames):
    measured = _delay(mouth_opening(sample.frames, sample.mouth_box), shift_frames)
    score = lip_sync(measured, sample.opening, max_lag_frames=4)
    assert score.best_lag_frames == shift_frames
    assert score.best_correlation > 0.98
    assert score.correlation_at_zero < score.best_correlation - 0.05


def test_measured_opening_is_zero_when_shut_and_grows_with_the_mouth(sample):
    measured = mouth_opening(sample.frames, sample.mouth_box)
    assert measured[sample.opening == 0].max() < 0.02
    wide, narrow = sample.opening > 0.7, (sample.opening > 0.05) & (sample.opening < 0.3)
    assert measured[wide].mean() > 2 * measured[narrow].mean() > 0


def test_frames_without_a_mouth_signal_give_zero_correlation(sample):
    still = np.repeat(sample.reference[None], len(sample.opening), axis=0)
    score = lip_sync(mouth_opening(still, sample.mouth_box), sample.opening)
    assert score.correlation_at_zero == 0.0


def test_identity_ignores_the_mouth_but_sees_another_face(sample):
    own = identity_similarity(sample.frames, sample.reference, sample.mouth_box)
    assert own.psnr_db > 20 and own.ssim > 0.85
    same = identity_similarity(sample.reference[None], sample.reference, sample.mouth_box)
    assert same.psnr_db > 90 and same.ssim > 0.999
    other = make_sample("heldout", 2, SIZE, FPS)
    stranger = identity_similarity(other.frames, sample.reference, sample.mouth_box)
    assert stranger.psnr_db < own.psnr_db - 5


def test_bad_inputs_are_rejected_with_the_value(sample):
    with pytest.raises(ValueError, match="does not fit"):
        mouth_opening(sample.frames, (0, 0, SIZE + 5, 10))
    with pytest.raises(ValueError, match="at least"):
        lip_sync(np.zeros(5), np.zeros(5), max_lag_frames=4)
