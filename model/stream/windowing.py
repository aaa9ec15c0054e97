"""Cut a stream of mono PCM into the model's clip windows: left context + one clip of new audio (+ look-ahead).

Both the live server (mic audio in arbitrary packet sizes) and the offline CLI (a whole file) feed
this one class, so a clip sees the same audio whichever way it arrived. Pure numpy, no torch.
"""
from __future__ import annotations

import numpy as np

from model.io_types import AudioWindow


class ClipWindower:
    """Buffers PCM at the model rate and emits an `AudioWindow` each time a whole clip of new audio is in.

    The first window's context is silence (zeros). Stream time comes from the first chunk's `t_s`
    (or 0.0); later chunks may carry their own `t_s`, and a gap is filled with silence while an
    overlap is dropped, so `t0` of every window stays on the sample grid of the stream.

    With `lookahead_samples` L > 0 a window also carries the L samples that follow its clip (the encoder
    hears them; the clip is still cut where it is), so it is emitted only once they are in: L samples
    later than without, which a live stream pays in latency.
    """

    def __init__(self, clip_samples: int, context_samples: int, sample_rate_hz: int,
                 time_tolerance_s: float = 0.001, lookahead_samples: int = 0) -> None:
        if clip_samples <= 0:
            raise ValueError(f"clip_samples must be > 0, got {clip_samples}")
        if context_samples < 0:
            raise ValueError(f"context_samples must be >= 0, got {context_samples}")
        if lookahead_samples < 0:
            raise ValueError(f"lookahead_samples must be >= 0, got {lookahead_samples}")
        self.lookahead_samples = lookahead_samples
        if sample_rate_hz <= 0:
            raise ValueError(f"sample_rate_hz must be > 0, got {sample_rate_hz}")
        self.clip_samples = clip_samples
        self.context_samples = context_samples
        self.sample_rate_hz = sample_rate_hz
        self._tolerance_samples = max(1, round(time_tolerance_s * sample_rate_hz))
        # [context | pending new audio]; never longer than context + clip + one chunk
        self._buffer = np.zeros(context_samples, dtype=np.float32)
        self._origin_s: float | None = None
        self._received = 0  # samples placed on the stream grid so far (pushed + gap fill - dropped)
        self._next_clip_index = 0

    @property
    def pending_samples(self) -> int:
        """New samples waiting for a clip to fill up."""
        return len(self._buffer) - self.context_samples

    @property
    def next_clip_index(self) -> int:
        return self._next_clip_index

    def push(self, pcm: np.ndarray, t_s: float | None = None) -> list[AudioWindow]:
        """Add a chunk of float32 mono PCM whose first sample plays at stream time `t_s`; return full windows."""
        pcm = np.asarray(pcm)
        if pcm.ndim != 1:
            raise ValueError(f"expected mono PCM of shape [N], got shape {pcm.shape}; mix down channels first")
        pcm = pcm.astype(np.float32, copy=False)
        if self._origin_s is None:
            self._origin_s = 0.0 if t_s is None else float(t_s)
        elif t_s is not None:
            pcm = self._align_to_grid(pcm, t_s)
        if len(pcm):
            self._buffer = np.concatenate([self._buffer, pcm])
            self._received += len(pcm)
        return self._take_windows()

    def flush(self) -> list[AudioWindow]:
        """End of stream: pad the last partial clip (and its look-ahead) with silence and return the windows of
        every clip that holds audio (empty list if none)."""
        if self.pending_samples <= 0:
            return []
        clips = -(-self.pending_samples // self.clip_samples)
        pad = clips * self.clip_samples + self.lookahead_samples - self.pending_samples
        if pad > 0:
            self._buffer = np.concatenate([self._buffer, np.zeros(pad, dtype=np.float32)])
            self._received += pad
        windows = self._take_windows()
        # what is left after the context is the last clip's look-ahead padding: silence, not a clip
        self._buffer = self._buffer[:self.context_samples]
        self._received -= self.lookahead_samples
        return windows

    def _align_to_grid(self, pcm: np.ndarray, t_s: float) -> np.ndarray:
        """Fill a gap before `pcm` with silence, or drop its samples that overlap audio already taken."""
        expected = round((t_s - self._origin_s) * self.sample_rate_hz)
        offset = expected - self._received
        if abs(offset) <= self._tolerance_samples:
            return pcm
        if offset > 0:
            self._buffer = np.concatenate([self._buffer, np.zeros(offset, dtype=np.float32)])
            self._received += offset
            return pcm
        return pcm[-offset:]

    def _take_windows(self) -> list[AudioWindow]:
        windows = []
        window_len = self.context_samples + self.clip_samples + self.lookahead_samples
        while len(self._buffer) >= window_len:
            index = self._next_clip_index
            windows.append(AudioWindow(
                samples=self._buffer[:window_len].copy(),
                new_from=self.context_samples,
                t0=self._origin_s + index * self.clip_samples / self.sample_rate_hz,
                clip_index=index,
                lookahead=self.lookahead_samples,
            ))
            self._buffer = self._buffer[self.clip_samples:]
            self._next_clip_index += 1
        return windows
