"""Plain data passed between the server and the model: audio windows in, video clips out.

Kept free of torch and WebRTC so both sides can import it without knowing the other.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AudioWindow:
    """Mono float32 audio at the model's rate: left context followed by the clip's new audio."""

    samples: np.ndarray  # float32 [N], context + new audio
    new_from: int  # index where the audio not yet seen by the model begins
    t0: float  # stream time of samples[new_from], seconds
    clip_index: int

    @property
    def new_samples(self) -> np.ndarray:
        return self.samples[self.new_from:]


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
