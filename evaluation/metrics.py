"""Lip sync and identity, measured on decoded frames: how well the mouth follows the voice, and whose face it is.

The mouth is found by where it must be (a pixel box known for the identity), so the measure needs no
face detector: inside the box, the open mouth is the region much darker than the surrounding skin.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MouthBox = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end exclusive

# Darker than this fraction of the skin's luma counts fully as mouth interior; lighter than the upper one,
# not at all (lips sit near 0.8 of the skin, the interior near 0.1-0.3).
_DARK_FULL = 0.4
_DARK_NONE = 0.62
_TOP_COLUMNS = 3


@dataclass(frozen=True)
class LipSyncScore:
    """Pearson correlation of measured vs true mouth opening at lag 0 and at the best lag within the search."""

    correlation_at_zero: float
    best_lag_frames: int  # > 0: the video is late by this many frames
    best_correlation: float
    correlation_by_lag: dict[int, float]


@dataclass(frozen=True)
class IdentityScore:
    """How close generated frames stay to the reference outside the mouth box (mean over frames)."""

    psnr_db: float
    ssim: float


def luma(frames: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma in 0..1 of uint8 RGB frames [..., 3]."""
    rgb = frames.astype(np.float32) / 255.0
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def mouth_opening(frames: np.ndarray, box: MouthBox) -> np.ndarray:
    """Per frame mouth opening as a fraction of the box height: the tallest dark columns inside the box.

    Skin brightness is taken per frame from the box itself (its 75th luma percentile), so lighting,
    skin tone and a blurry decoder shift the threshold with the face.
    """
    frames = _as_video(frames)
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= frames.shape[2] and 0 <= y0 < y1 <= frames.shape[1]):
        raise ValueError(f"mouth box {box} does not fit frames of size {frames.shape[2]}x{frames.shape[1]}")
    region = luma(frames[:, y0:y1, x0:x1])  # [T, h, w]
    skin = np.percentile(region.reshape(len(region), -1), 75, axis=1)[:, None, None]
    darkness = np.clip((_DARK_NONE * skin - region) / ((_DARK_NONE - _DARK_FULL) * skin + 1e-6), 0.0, 1.0)
    column_heights = np.sort(darkness.sum(axis=1), axis=1)[:, -_TOP_COLUMNS:]  # [T, k]
    return (column_heights.mean(axis=1) / (y1 - y0)).astype(np.float32)


def lip_sync(measured: np.ndarray, truth: np.ndarray, max_lag_frames: int = 4) -> LipSyncScore:
    """Correlate measured with true opening at every lag in ±max_lag_frames; report lag 0 and the best."""
    measured = np.asarray(measured, np.float64)
    truth = np.asarray(truth, np.float64)
    count = min(len(measured), len(truth))
    if count < 2 * max_lag_frames + 3:
        raise ValueError(f"need at least {2 * max_lag_frames + 3} frames to search ±{max_lag_frames} frames "
                         f"of lag, got {count}")
    measured, truth = measured[:count], truth[:count]
    by_lag = {}
    for lag in range(-max_lag_frames, max_lag_frames + 1):
        # lag > 0: frame t + lag shows the mouth the audio of frame t asked for
        video = measured[max(lag, 0): count + min(lag, 0)]
        audio = truth[max(-lag, 0): count - max(lag, 0)]
        by_lag[lag] = _pearson(video, audio)
    best_lag = max(by_lag, key=lambda k: (by_lag[k], -abs(k)))
    return LipSyncScore(correlation_at_zero=by_lag[0], best_lag_frames=best_lag,
                        best_correlation=by_lag[best_lag], correlation_by_lag=by_lag)


def identity_similarity(frames: np.ndarray, reference: np.ndarray, box: MouthBox) -> IdentityScore:
    """PSNR and SSIM of each frame against the reference with the mouth box left out, averaged over frames."""
    frames = _as_video(frames)
    if reference.shape != frames.shape[1:]:
        raise ValueError(f"reference shape {reference.shape} differs from frame shape {frames.shape[1:]}")
    keep = np.ones(frames.shape[1:3], bool)
    x0, y0, x1, y1 = box
    keep[y0:y1, x0:x1] = False
    ref = reference.astype(np.float32) / 255.0
    ref_luma = luma(reference)
    psnrs, ssims = [], []
    for frame in frames:
        err = ((frame.astype(np.float32) / 255.0 - ref) ** 2)[keep].mean()
        psnrs.append(10 * np.log10(1.0 / max(float(err), 1e-10)))
        ssims.append(float(_ssim_map(luma(frame), ref_luma)[keep].mean()))
    return IdentityScore(psnr_db=float(np.mean(psnrs)), ssim=float(np.mean(ssims)))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 1e-12 else 0.0


def _box_mean(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window with edge padding, via a summed-area table."""
    k = 2 * radius + 1
    padded = np.pad(image, radius + 1, mode="edge")[:-1, :-1].astype(np.float64)
    table = padded.cumsum(0).cumsum(1)
    total = table[k:, k:] - table[:-k, k:] - table[k:, :-k] + table[:-k, :-k]
    return total / (k * k)


def _ssim_map(a: np.ndarray, b: np.ndarray, radius: int = 3) -> np.ndarray:
    """SSIM (Wang et al. 2004) per pixel on 0..1 images, uniform 7x7 window."""
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _box_mean(a, radius), _box_mean(b, radius)
    var_a = _box_mean(a * a, radius) - mu_a**2
    var_b = _box_mean(b * b, radius) - mu_b**2
    cov = _box_mean(a * b, radius) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def _as_video(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames uint8 [T, H, W, 3], got shape {frames.shape}")
    return frames
