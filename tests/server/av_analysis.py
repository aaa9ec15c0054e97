"""Measurements on what a client received: idle vs model-made frames, returned-voice alignment, A/V offset."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.io_types import VideoClip
from tests.server.webrtc_client import ReceivedAudio, ReceivedVideo

RATE_HZ = 48000


def idle_distance(frame_rgb: np.ndarray, reference_rgb: np.ndarray) -> float:
    """RMS distance (0..255 levels) to the nearest idle frame.

    Idle frames are the reference at a slowly breathing brightness (`AvatarVideoTrack.idle_frame`), so
    the nearest one is the reference at the least-squares gain, clipped as the track clips it.
    """
    frame = frame_rgb.astype(np.float64)
    reference = reference_rgb.astype(np.float64)
    gain = (frame * reference).sum() / max((reference * reference).sum(), 1e-9)
    return float(np.sqrt(np.mean((frame - np.clip(reference * gain, 0, 255)) ** 2)))


def nearest_made_frame(frame_rgb: np.ndarray, made_rgb: np.ndarray) -> tuple[int, float]:
    """Index of the model frame (of `made_rgb`, [N, H, W, 3]) nearest to a received frame, and its RMS distance."""
    diff = np.asarray(made_rgb, dtype=np.float32) - frame_rgb.astype(np.float32)
    distances = np.sqrt(np.mean(diff * diff, axis=(1, 2, 3)))
    index = int(np.argmin(distances))
    return index, float(distances[index])


def is_clip_frame(frame_rgb: np.ndarray, reference_rgb: np.ndarray, made_rgb: np.ndarray) -> bool:
    """True when a received frame is one the model made (or one held from it), not an idle frame.

    Decided by which it is nearer to, after the codec: the frames the model made for this session or
    the reference at any brightness. A model that paints the reference closely (the trained avatar
    does: its clip frames correlate with it at r > 0.9) is still told apart, with no fixed threshold.
    """
    if not len(made_rgb):
        return False
    return nearest_made_frame(frame_rgb, made_rgb)[1] < idle_distance(frame_rgb, reference_rgb)


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
    samples: int = 0  # its length in the sent speech


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
        chunks.append(ChunkAlignment(start, found.lag_samples, found.peak, size))
    return chunks


def align_pieces(sent: np.ndarray, received: np.ndarray, chunk_s: float = 0.5, min_s: float = 0.125,
                 whole: float = 0.8) -> list[ChunkAlignment]:
    """`align_chunks`, where a chunk that does not come back whole is split in halves, each aligned on its own.

    The returned voice pauses wherever playout stands still (a late part, a delay rise held), and that can
    be at any stream time, so a chunk may come back in pieces with a short silence between them; each
    piece must still be the sent voice. Halving stops at `min_s` (shorter pieces match speech elsewhere).
    """
    sent = sent.astype(np.float64)
    loud = np.sqrt(np.mean(sent ** 2))
    pieces: list[ChunkAlignment] = []

    def place(start: int, size: int) -> None:
        found = align(sent[start:start + size], received)
        if found.peak > whole or size < 2 * int(min_s * RATE_HZ):
            pieces.append(ChunkAlignment(start, found.lag_samples, found.peak, size))
            return
        half = size // 2
        for part_start, part_size in ((start, half), (start + half, size - half)):
            if np.sqrt(np.mean(sent[part_start:part_start + part_size] ** 2)) >= 0.3 * loud:
                place(part_start, part_size)

    for chunk in align_chunks(sent, received, chunk_s):
        if chunk.peak > whole:
            pieces.append(chunk)
        else:
            place(chunk.start_samples, chunk.samples)
    return pieces


def first_clip_frame(video: list[ReceivedVideo], reference_rgb: np.ndarray,
                     made_rgb: np.ndarray) -> ReceivedVideo | None:
    """The first received frame that the model made (see `is_clip_frame`)."""
    return next((v for v in video if is_clip_frame(v.rgb, reference_rgb, made_rgb)), None)


def made_frames_between(parts: list[VideoClip], start_s: float, end_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Frames the model made (parts as queued for playout) for stream time [start_s, end_s), and their times."""
    frames, times = [], []
    for part in parts:
        for k, rgb in enumerate(part.frames):
            t = part.t0 + k / part.fps
            if start_s <= t < end_s:
                frames.append(rgb)
                times.append(t)
    return np.array(frames), np.array(times)


def seen_made_frames(video: list[ReceivedVideo], made: np.ndarray, reference: np.ndarray) -> list[int]:
    """Indices (into `made`) of the made frames a viewer received, in the order received."""
    seen = []
    for v in video:
        index, distance = nearest_made_frame(v.rgb, made)
        if distance < 0.5 * idle_distance(v.rgb, reference):
            seen.append(index)
    return seen


def av_offsets(video: list[ReceivedVideo], made: np.ndarray, times: np.ndarray, speech: np.ndarray, speech_start_s: float,
               pcm: np.ndarray, arrival: np.ndarray, reference: np.ndarray, chunk_s: float = 0.125) -> list[float]:
    """Arrival of each made frame (its first showing) minus the arrival of the voice at its stream time."""
    first_shown: dict[int, float] = {}
    for v in video:
        index, distance = nearest_made_frame(v.rgb, made)
        if distance < 0.5 * idle_distance(v.rgb, reference):
            first_shown.setdefault(index, v.arrival_s)
    loud = np.sqrt(np.mean(speech.astype(np.float64) ** 2))
    size = round(chunk_s * RATE_HZ)
    offsets = []
    for index, video_arrival_s in first_shown.items():
        start = round((times[index] - speech_start_s) * RATE_HZ)
        chunk = speech[start:start + size].astype(np.float64)
        if start < 0 or len(chunk) < size or np.sqrt(np.mean(chunk ** 2)) < 0.3 * loud:
            continue  # before the speech, past its end, or a pause: nothing to find in the voice
        found = align(chunk, pcm)
        if found.peak > 0.9:
            offsets.append(video_arrival_s - arrival[found.lag_samples])
    return offsets
