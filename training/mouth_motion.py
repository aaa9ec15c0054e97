"""How the synthetic mouth moves with the voice: loudness opens it, spectral shape spreads or rounds it.

Frame i shows the audio around its centre, (i + 0.5) / fps seconds, so a model that reads the audio of
frame i should draw frame i's mouth: the ground truth has no built-in lag.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Speech peaks at 0.5 full scale land around -20 dBFS in the vowel band; room tone sits below -55.
_OPEN_FLOOR_DB = -48.0
_OPEN_RANGE_DB = 24.0
_VOWEL_BAND_HZ = (150.0, 3000.0)
_SHAPE_BAND_HZ = (300.0, 4000.0)


@dataclass(frozen=True)
class MouthTrack:
    """Per video frame mouth pose: `opening` 0 closed .. 1 wide open, `spread` 0 rounded .. 1 spread."""

    opening: np.ndarray  # float32 [T]
    spread: np.ndarray  # float32 [T]

    def __len__(self) -> int:
        return len(self.opening)


def frame_count(num_samples: int, sample_rate_hz: int, fps: float) -> int:
    """Whole video frames covered by `num_samples` of audio."""
    return int(np.floor(num_samples / sample_rate_hz * fps + 1e-9))


def mouth_track(clean: np.ndarray, sample_rate_hz: int, fps: float, num_frames: int | None = None) -> MouthTrack:
    """Mouth pose for every frame from clean speech (loudness of the vowel band, smoothed; spectral centroid)."""
    if num_frames is None:
        num_frames = frame_count(len(clean), sample_rate_hz, fps)
    window_len = round(2 * sample_rate_hz / fps)
    window = np.hanning(window_len).astype(np.float32)
    padded = np.pad(clean.astype(np.float32), (window_len, window_len))
    starts = (np.round((np.arange(num_frames) + 0.5) / fps * sample_rate_hz).astype(int)
              - window_len // 2 + window_len)
    segments = np.stack([padded[s: s + window_len] for s in starts]) * window  # [T, W]
    power = np.abs(np.fft.rfft(segments, axis=1)) ** 2
    freqs_hz = np.fft.rfftfreq(window_len, 1.0 / sample_rate_hz)
    window_energy = float((window**2).sum())

    vowel = (freqs_hz >= _VOWEL_BAND_HZ[0]) & (freqs_hz < _VOWEL_BAND_HZ[1])
    # rfft energy of a band -> mean square of the windowed signal in that band
    band_power = 2 * power[:, vowel].sum(axis=1) / (window_len * window_energy)
    level_db = 10 * np.log10(band_power + 1e-12)
    opening = np.clip((level_db - _OPEN_FLOOR_DB) / _OPEN_RANGE_DB, 0.0, 1.0)
    opening = _smooth(opening, (0.25, 0.5, 0.25))

    shape = (freqs_hz >= _SHAPE_BAND_HZ[0]) & (freqs_hz < _SHAPE_BAND_HZ[1])
    shape_power = power[:, shape]
    centroid_hz = (shape_power * freqs_hz[shape]).sum(axis=1) / (shape_power.sum(axis=1) + 1e-12)
    spread = np.clip((centroid_hz - 600.0) / 1200.0, 0.0, 1.0)
    # Silence relaxes to a neutral shape rather than keeping the last vowel's.
    spread = 0.5 + (spread - 0.5) * np.clip(opening * 3.0, 0.0, 1.0)
    spread = _smooth(spread, (0.2, 0.2, 0.2, 0.2, 0.2))
    return MouthTrack(opening=opening.astype(np.float32), spread=spread.astype(np.float32))


def _smooth(values: np.ndarray, kernel: tuple[float, ...]) -> np.ndarray:
    """Zero-phase smoothing: a symmetric kernel moves no peak in time."""
    half = len(kernel) // 2
    padded = np.pad(values, (half, half), mode="edge")
    return np.convolve(padded, np.asarray(kernel), mode="valid")
