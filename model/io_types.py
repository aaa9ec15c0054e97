"""Plain data passed between the server and the model: audio windows in, video clips out.

Kept free of torch and WebRTC so both sides can import it without knowing the other.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AudioWindow:
    """Mono float32 audio at the model's rate: left context, the clip's new audio, then optional look-ahead
    (audio after the clip that the speech encoder may hear; the clip itself ends before it)."""

    samples: np.ndarray  # float32 [N], context + new audio + look-ahead
    new_from: int  # index where the audio not yet seen by the model begins
    t0: float  # stream time of samples[new_from], seconds
    clip_index: int
    lookahead: int = 0  # samples at the end that follow the clip (model.audio_encoder.lookahead_s)

    @property
    def new_samples(self) -> np.ndarray:
        """The clip's own audio: after the context, before the look-ahead."""
        return self.samples[self.new_from:len(self.samples) - self.lookahead]


@dataclass(frozen=True)
class VideoClip:
    """Decoded frames for one clip (or one part of it), stamped with the stream time of its first frame.

    A clip may come in parts, one per denoised block, so the first frames leave before the whole clip is
    done: `offset` is the index of frames[0] within the clip, `final` marks the clip's last part.
    """

    frames: np.ndarray  # uint8 [T, H, W, 3]
    t0: float  # stream time of frames[0], seconds
    fps: float
    clip_index: int
    offset: int = 0
    final: bool = True

    @property
    def duration_s(self) -> float:
        return len(self.frames) / self.fps
