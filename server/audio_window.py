"""The browser's audio in, the model's clip windows out, on the stream clock of the RTP timestamps.

WebRTC hands us Opus decoded to 48 kHz stereo in frames of any size; the model wants mono float32
at its own rate, cut into left-context + clip (+ look-ahead) windows (`model.stream.windowing.ClipWindower`).
"""
from __future__ import annotations

import av

from model.io_types import AudioWindow
from model.stream.windowing import ClipWindower


def frame_stream_time_s(frame: av.AudioFrame) -> float:
    """Stream time of a frame's first sample: its pts on the RTP clock (aiortc starts pts at 0)."""
    if frame.pts is None or frame.time_base is None:
        raise ValueError("audio frame has no pts/time_base; the stream clock cannot be followed")
    return float(frame.pts * frame.time_base)


class AudioWindowCutter:
    """Resamples incoming frames to the model's rate (mono) and cuts them into clip windows.

    Gaps in the RTP clock (lost packets, muted mic) become silence and overlaps are dropped by the
    windower, so every window's `t0` is the stream time of the speech it holds.
    """

    def __init__(self, sample_rate_hz: int, clip_samples: int, context_samples: int,
                 lookahead_samples: int = 0) -> None:
        self.sample_rate_hz = sample_rate_hz
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate_hz)
        # look-ahead: a window leaves once the audio after its clip is in (model.audio_encoder.lookahead_s)
        self._windower = ClipWindower(clip_samples, context_samples, sample_rate_hz,
                                      lookahead_samples=lookahead_samples)
        self.samples_in = 0  # model-rate samples handed to the windower

    @property
    def clip_duration_s(self) -> float:
        return self._windower.clip_samples / self.sample_rate_hz

    def push(self, frame: av.AudioFrame) -> list[AudioWindow]:
        """Take one decoded frame; return the windows it completed (usually none, one per clip)."""
        windows: list[AudioWindow] = []
        for out in self._resampler.resample(frame):
            pcm = out.to_ndarray().reshape(-1)
            # the resampler carries the input's pts onto its own rate, so gaps survive resampling
            t_s = float(out.pts * out.time_base) if out.pts is not None else None
            self.samples_in += len(pcm)
            windows.extend(self._windower.push(pcm, t_s))
        return windows
