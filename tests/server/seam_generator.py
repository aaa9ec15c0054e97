"""A small ClipGenerator for exercising the live path without the model: frames follow the audio's loudness."""
from __future__ import annotations

import asyncio

import numpy as np

from model.io_types import AudioWindow, VideoClip
from server.engine import check_sample_steps
from server.seam import GeneratorStats, StreamFormat


class LoudnessGenerator:
    """Each frame is a flat gray whose level is the loudness of the audio it stands for."""

    def __init__(self, work_s: float = 0.2) -> None:
        self.stream_format = StreamFormat(fps=16.0, frames_per_clip=12, frame_size=(128, 128),
                                          sample_rate_hz=16000, clip_samples=12000, context_samples=16000)
        self._work_s = work_s
        self._steps: dict[str, int] = {}
        self._stats: dict[str, dict] = {}

    async def start(self, session_id: str, reference_image: np.ndarray, prompt: str) -> None:
        self._steps[session_id] = 4
        self._stats[session_id] = dict(clips_done=0, last_clip_index=None, last_clip_sample_steps=None)

    async def submit(self, session_id: str, window: AudioWindow) -> VideoClip:
        steps = self._steps[session_id]
        await asyncio.sleep(self._work_s)
        fmt = self.stream_format
        per_frame = window.new_samples.reshape(fmt.frames_per_clip, -1)
        level = np.clip(np.sqrt((per_frame ** 2).mean(axis=1)) * 2000, 0, 255).astype(np.uint8)
        frames = np.broadcast_to(level[:, None, None, None], (fmt.frames_per_clip, *fmt.frame_size, 3)).copy()
        self._stats[session_id].update(clips_done=self._stats[session_id]["clips_done"] + 1,
                                       last_clip_index=window.clip_index, last_clip_sample_steps=steps)
        return VideoClip(frames=frames, t0=window.t0, fps=fmt.fps, clip_index=window.clip_index)

    async def stop(self, session_id: str) -> None:
        self._steps.pop(session_id, None)

    def set_sample_steps(self, session_id: str, sample_steps: int) -> None:
        self._steps[session_id] = check_sample_steps(sample_steps)

    def stats(self, session_id: str) -> GeneratorStats:
        s = self._stats[session_id]
        return GeneratorStats(queue_depth=0, sample_steps=self._steps[session_id], clips_done=s["clips_done"],
                              clips_dropped=0, last_clip_index=s["last_clip_index"],
                              last_clip_sample_steps=s["last_clip_sample_steps"],
                              last_generation_s=self._work_s)
