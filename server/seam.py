"""The seam between the streaming server and whatever makes the video (`ClipGenerator`)."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from model.io_types import AudioWindow, VideoClip


class ClipGenerator(Protocol):
    """Turns a session's audio windows into video clips; one implementation per engine."""

    async def start(self, session_id: str, reference_image: np.ndarray, prompt: str) -> None: ...

    async def submit(self, session_id: str, window: AudioWindow) -> VideoClip: ...

    async def stop(self, session_id: str) -> None: ...
