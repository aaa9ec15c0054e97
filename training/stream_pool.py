"""A pool of rendered talking-face streams in memory, cut the way the model sees them: clip by clip.

Each stream is one identity saying one utterance from its first frame, so clip k of a stream is exactly
what the live path would produce for the k-th clip window (silence before the stream as left context).
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from training.speech import Utterance
from training.synthetic_faces import Identity, random_crop
from training.talking_dataset import TalkingSample, render_drawn_sample, render_sample, render_still_sample


@dataclass(frozen=True)
class StreamGeometry:
    """How the model cuts time: frames per clip, fps, audio rate and the left context each window carries."""

    size: int
    fps: float
    frames_per_clip: int
    sample_rate_hz: int
    context_samples: int

    @property
    def clip_samples(self) -> int:
        return round(self.frames_per_clip / self.fps * self.sample_rate_hz)


@dataclass
class Stream:
    """One rendered sample with its clip windows: windows[k] is the audio clip k is generated from."""

    sample: TalkingSample
    windows: np.ndarray  # float32 [num_clips, context + clip]

    @property
    def num_clips(self) -> int:
        return len(self.windows)


def clip_windows(audio: np.ndarray, geometry: StreamGeometry) -> np.ndarray:
    """All whole clip windows of `audio` (silence before it as context), as the live windower cuts them."""
    clip, context = geometry.clip_samples, geometry.context_samples
    num_clips = len(audio) // clip
    padded = np.concatenate([np.zeros(context, np.float32), audio.astype(np.float32)])
    return np.stack([padded[k * clip: k * clip + context + clip] for k in range(num_clips)]) if num_clips else \
        np.zeros((0, context + clip), np.float32)


def _render(job: tuple) -> TalkingSample:
    kind, subject, utterance, motion_seed, size, fps = job
    if kind == "drawn":
        return render_drawn_sample(utterance, size, fps)
    if kind == "photo":
        return render_still_sample(subject, utterance, size, fps)
    return render_sample(subject, utterance, motion_seed=motion_seed, size=size, fps=fps)


def build_pool(utterances: list[Utterance], identities: list[Identity], num_streams: int, geometry: StreamGeometry,
               seed: int, workers: int = 1, drawn_share: float = 0.0, photos: np.ndarray | None = None,
               photo_share: float = 0.0) -> list[Stream]:
    """`num_streams` random (identity, utterance) pairings, rendered (in `workers` processes when > 1).

    A `drawn_share` of the streams show the server's drawn default face talking, and a `photo_share` a
    random crop of one of `photos` that must come back unchanged whatever is said (no mouth to move).
    """
    rng = np.random.default_rng([seed, 17])
    jobs = []
    for k in range(num_streams):
        identity = identities[int(rng.integers(len(identities)))]
        utterance = utterances[int(rng.integers(len(utterances)))]
        draw = rng.random()
        if draw < drawn_share:
            kind, subject = "drawn", None
        elif draw < drawn_share + photo_share and photos is not None and len(photos):
            kind, subject = "photo", random_crop(photos[int(rng.integers(len(photos)))], rng, 2 * geometry.size)
        else:
            kind, subject = "face", identity
        jobs.append((kind, subject, utterance, int(seed * 100_003 + k), geometry.size, geometry.fps))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            samples = list(pool.map(_render, jobs, chunksize=4))
    else:
        samples = [_render(job) for job in jobs]
    streams = []
    for sample in samples:
        windows = clip_windows(sample.audio, geometry)
        if len(windows):
            streams.append(Stream(sample=sample, windows=windows))
    return streams
