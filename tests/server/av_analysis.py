"""Measurements on what a client received: idle vs clip frames, returned-voice alignment, A/V offset."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tests.server.webrtc_client import ReceivedAudio, ReceivedVideo

RATE_HZ = 48000


def looks_like(frame_rgb: np.ndarray, reference_rgb: np.ndarray, threshold: float = 0.9) -> bool:
    """True when the frame is the reference up to brightness (what idle frames are): Pearson r > threshold."""
    a = frame_rgb.astype(np.float64).ravel()
    b = reference_rgb.astype(np.float64).ravel()
    a -= a.mean()
    b -= b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return bool(denom > 0 and (a * b).sum() / denom > threshold)


def audio_timeline(audio: list[ReceivedAudio]) -> tuple[np.ndarray, np.ndarray]:
    """Received voice placed by pts, and the arrival time of every sample's frame."""
    end = max(a.pts + len(a.pcm) for a in audio)
    pcm = np.zeros(end, dtype=np.float64)
    arrival = np.full(end, np.nan)
    for a in audio:
        pcm[a.pts:a.pts + len(a.pcm)] = a.pcm
        arrival[a.pts:a.pts + len(a.pcm)] = a.arrival_s + np.arange(len(a.pcm)) / RATE_HZ
    return pcm, arrival


@dataclass(frozen=True)
class Alignment:
    lag_samples: int  # received[lag + i] ~ sent[i]
    peak: float  # normalised cross-correlation at the lag (1.0 = identical waveform)


def align(sent: np.ndarray, received: np.ndarray) -> Alignment:
    """Where the sent speech sits inside the received audio (FFT cross-correlation)."""
    sent = sent.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(sent) + len(received))))
    corr = np.fft.irfft(np.fft.rfft(received, n) * np.conj(np.fft.rfft(sent, n)), n)[:len(received)]
    lag = int(np.argmax(corr))
    segment = received[lag:lag + len(sent)]
    denom = np.linalg.norm(sent[:len(segment)]) * np.linalg.norm(segment)
    return Alignment(lag, float(corr[lag] / denom) if denom > 0 else 0.0)


@dataclass(frozen=True)
class ChunkAlignment:
    start_samples: int  # where the chunk begins in the sent speech
    lag_samples: int  # where it begins in the received audio
    peak: float


def align_chunks(sent: np.ndarray, received: np.ndarray, chunk_s: float = 0.5) -> list[ChunkAlignment]:
    """Align each voiced chunk of the sent speech on its own.

    When generation falls behind, the playout delay steps up between clips and the returned voice gets a
    short silence there (that is what keeps it on its video), so one global correlation would understate
    how well the voice came back; each chunk between such steps must still come back unchanged.
    """
    sent = sent.astype(np.float64)
    size = int(chunk_s * RATE_HZ)
    loud = np.sqrt(np.mean(sent ** 2))
    chunks = []
    for start in range(0, len(sent) - size + 1, size):
        piece = sent[start:start + size]
        if np.sqrt(np.mean(piece ** 2)) < 0.3 * loud:
            continue  # a pause: nothing to recognise
        found = align(piece, received)
        chunks.append(ChunkAlignment(start, found.lag_samples, found.peak))
    return chunks


def first_clip_frame(video: list[ReceivedVideo], reference_rgb: np.ndarray) -> ReceivedVideo | None:
    return next((v for v in video if not looks_like(v.rgb, reference_rgb)), None)
