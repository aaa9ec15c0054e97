"""The seam between the streaming server and whatever makes the video (`ClipGenerator`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from model.io_types import AudioWindow, VideoClip


class EngineBusy(RuntimeError):
    """Every session slot is taken; the message says how many and what to do."""


class SessionClosed(RuntimeError):
    """The session was stopped (or never started); its work is cancelled."""


class SessionLost(RuntimeError):
    """The generator lost this session's state (its worker died); the session must start again."""


class ClipDropped(RuntimeError):
    """A queued window was dropped because the session fell behind (newer audio took its place)."""


@dataclass(frozen=True)
class StreamFormat:
    """The shape of the stream a generator makes: what the windower cuts and the tracks send."""

    fps: float
    frames_per_clip: int
    frame_size: tuple[int, int]  # (height, width)
    sample_rate_hz: int
    clip_samples: int  # new audio per clip
    context_samples: int  # left context before it
    lookahead_samples: int = 0  # audio after it the encoder hears: the clip starts that much later
    # video.sizing aspect: (height, width) of video.size, the area under which each session's frame size
    # follows its reference image's aspect ratio; None: every session runs at frame_size
    sizing_area_hw: tuple[int, int] | None = None

    def for_reference(self, image_hw: tuple[int, int]) -> StreamFormat:
        """The format of a session started with a reference image of `image_hw` (its frame size, as the model
        picks it: `model.stream.sizing`)."""
        if self.sizing_area_hw is None:
            return self
        from model.stream.sizing import session_frame_size

        return replace(self, frame_size=session_frame_size("aspect", self.sizing_area_hw, tuple(image_hw[:2])))


@dataclass(frozen=True)
class GeneratorStats:
    """What one session's generator reports: its queue and the last clip it made."""

    queue_depth: int  # windows waiting or in work
    sample_steps: int  # used by the next clip to start
    clips_done: int
    clips_dropped: int
    last_clip_index: int | None
    last_clip_sample_steps: int | None
    last_generation_s: float | None
    last_first_part_s: float | None = None  # clip start -> its first part (the whole clip when not in parts)


class ClipGenerator(Protocol):
    """Turns a session's audio windows into video clips; one implementation per engine."""

    async def start(self, session_id: str, reference_image: np.ndarray, prompt: str) -> None: ...

    async def submit(self, session_id: str, window: AudioWindow,
                     on_part: Callable[[VideoClip], None] | None = None) -> VideoClip:
        """The window's clip; with `on_part`, each part as soon as it exists, then the final part."""
        ...

    async def stop(self, session_id: str) -> None: ...

    def set_sample_steps(self, session_id: str, sample_steps: int) -> None: ...

    def stats(self, session_id: str) -> GeneratorStats: ...

    @property
    def stream_format(self) -> StreamFormat: ...
