"""Where the received avatar goes: the camera and the recorder (video), the virtual microphone and the
recorder (voice), with the camera never left frozen or black.

Received frames go to the camera and the voice to the microphone the moment they are decoded (the server
already paces them at its fps and in step with each other). The recording places each at the time it was
due, its timestamp plus the track's arrival anchor, so network and scheduling jitter do not move it; a
stall shows there as the last frame held, a long one (a reconnect) as the breathing frames the camera got. When none comes for one and a half frame times (a stall, a reconnect) the last
frame is written again at the stream's fps; after `hold_s` it breathes (slowly brightens and dims, as the
server's idle frames do), so the people in the call see a waiting avatar, not a hung camera.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import numpy as np

from client_cam.camera_sink import VirtualCamera
from client_cam.errors import ClientError
from client_cam.recorder import Mp4Recorder

FORMAT_FRAMES = 4
SINK_ERRORS = (ClientError, OSError, RuntimeError, ValueError, av.error.FFmpegError)  # a sink that failed  # frames looked at to learn the stream's fps from their timestamps


@dataclass(frozen=True)
class StreamFormat:
    width: int
    height: int
    fps: float


def fps_from_pts(pts: list[int], time_base: float) -> float | None:
    """The stream's frame rate from consecutive frame timestamps (the smallest step: the sender may skip)."""
    steps = [b - a for a, b in itertools.pairwise(pts) if b > a]
    if not steps:
        return None
    return round(1.0 / (min(steps) * time_base), 3)


def breathing(rgb: np.ndarray, wall_s: float, period_s: float = 4.0, depth: float = 0.04) -> np.ndarray:
    """The waiting avatar: the frame slowly brightening and dimming (the server's idle animation)."""
    gain = 1.0 + depth * math.sin(2 * math.pi * wall_s / period_s)
    return np.clip(rgb.astype(np.float32) * gain, 0, 255).astype(np.uint8)


class ArrivalAnchor:
    """Wall time of a track's stream time 0: the earliest `arrival - pts` over a sliding window.

    A frame can arrive late (the network, a busy loop) but never early, so the minimum is the frame's
    due time without the jitter; the window follows slow drift between the server's clock and ours.
    """

    def __init__(self, window_s: float = 60.0) -> None:
        self._window_s = window_s
        self._candidates: deque[tuple[float, float]] = deque()  # (arrival, anchor), anchors rising

    def reset(self) -> None:
        self._candidates.clear()

    def place(self, pts_s: float, arrival_s: float) -> float:
        """The wall time this frame is due at."""
        anchor = arrival_s - pts_s
        while self._candidates and self._candidates[-1][1] >= anchor:
            self._candidates.pop()
        self._candidates.append((arrival_s, anchor))
        while arrival_s - self._candidates[0][0] > self._window_s:
            self._candidates.popleft()
        return self._candidates[0][1] + pts_s


@dataclass
class OutputCounters:
    frames_in: int = 0
    frames_out: int = 0
    filler_frames: int = 0
    audio_samples_in: int = 0
    history: list[tuple[float, int, int]] = field(default_factory=list)  # (wall, in, out) for the rates

    def rates(self, now_s: float, window_s: float = 2.0) -> tuple[float, float]:
        """Frames per second in and out over the last `window_s`."""
        self.history.append((now_s, self.frames_in, self.frames_out))
        while len(self.history) > 2 and now_s - self.history[1][0] >= window_s:
            self.history.pop(0)
        t0, in0, out0 = self.history[0]
        span = now_s - t0
        return ((self.frames_in - in0) / span, (self.frames_out - out0) / span) if span > 0 else (0.0, 0.0)


class AvatarOutput:
    """Fans received frames and voice out to the sinks; opens the video sinks once the format is known."""

    def __init__(self, camera_device: str | None, use_camera: bool, out_path: str | None, mic=None,
                 hold_s: float = 1.0, on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self._camera_device = camera_device
        self._use_camera = use_camera
        self._out_path = out_path
        self.mic = mic
        self.camera: VirtualCamera | None = None
        self.recorder: Mp4Recorder | None = None
        self.format: StreamFormat | None = None
        self._hold_s = hold_s
        self._on_fatal = on_fatal
        self._pts: list[int] = []
        self._last_rgb: np.ndarray | None = None
        self._last_write_s = 0.0
        self._last_received_s = 0.0
        self._show_lag_s = 0.0  # how long after its due time the last frame was shown
        self.started_s: float | None = None  # due time (monotonic) of the recording's frame 0
        self.counters = OutputCounters()
        self._video_anchor = ArrivalAnchor()
        self._audio_anchor = ArrivalAnchor()
        self._filler: asyncio.Task | None = None
        self.failed: BaseException | None = None  # the first sink error; nothing is written after it

    # ------------------------------------------------------------------ video

    def new_connection(self) -> None:
        """A new session's tracks start their timestamps afresh: place them anew."""
        self._video_anchor.reset()
        self._audio_anchor.reset()

    def on_video(self, rgb: np.ndarray, pts: int, time_base: float, held_s: float = 0.0) -> None:
        """A decoded frame from the server: to the camera now, into the recording at its due time.

        `held_s`: how long the receiver kept the frame after it arrived (its jitter buffer), taken off.
        """
        now = time.monotonic()
        self.counters.frames_in += 1
        self._last_received_s = now
        due_s = self._video_anchor.place(pts * time_base, now - held_s)
        if self.format is None:
            self._pts.append(pts)
            fps = fps_from_pts(self._pts, time_base) if len(self._pts) >= FORMAT_FRAMES else None
            if fps is None:
                return
            self._open(StreamFormat(rgb.shape[1], rgb.shape[0], fps), due_s)
        self._write(rgb, now, due_s)
        self._show_lag_s = now - due_s

    def _open(self, fmt: StreamFormat, first_due_s: float) -> None:
        self.format = fmt
        try:
            if self._use_camera:
                self.camera = VirtualCamera(fmt.width, fmt.height, fmt.fps, self._camera_device)
            if self._out_path:
                self.recorder = Mp4Recorder(self._out_path, fmt.width, fmt.height, fmt.fps)
        except SINK_ERRORS as exc:
            self._fail(exc)
            return
        self.started_s = first_due_s
        self._filler = asyncio.get_running_loop().create_task(self._fill_stalls(), name="camera-filler")

    def _write(self, rgb: np.ndarray, now_s: float, due_s: float | None) -> None:
        """To the camera now; into the recording at `due_s` (None: not recorded, the recording holds its frame)."""
        if self.started_s is None or self.failed is not None:
            return
        try:
            if self.camera is not None:
                self.camera.send(rgb)
            if self.recorder is not None and due_s is not None:
                self.recorder.write_video(rgb, due_s - self.started_s)
        except SINK_ERRORS as exc:
            self._fail(exc)
            return
        self._last_rgb = rgb
        self._last_write_s = now_s
        self.counters.frames_out += 1

    async def _fill_stalls(self) -> None:
        """Keep the camera fed at the stream's fps while the server's frames do not come."""
        period_s = 1.0 / self.format.fps
        while True:
            await asyncio.sleep(period_s / 2)
            now = time.monotonic()
            if self._last_rgb is None or now - self._last_write_s < 1.5 * period_s:
                continue
            last, stalled_s = self._last_rgb, now - self._last_received_s
            if stalled_s <= self._hold_s:  # a short stall: late frames may still come for these slots
                self._write(last, now, None)
            else:  # nothing is coming (a reconnect): the recording shows what the camera shows
                self._write(breathing(last, now), now, now - self._show_lag_s)
            self._last_rgb = last  # breathe around the real last frame, not a brightened copy
            self.counters.filler_frames += 1

    # ------------------------------------------------------------------ voice

    def on_audio(self, pcm: np.ndarray, pts_s: float, held_s: float = 0.0) -> None:
        """Decoded returned voice (int16 mono 48 kHz) starting at stream time `pts_s`: to the microphone
        now, into the recording at its due time (`held_s` as for video)."""
        now = time.monotonic()
        self.counters.audio_samples_in += len(pcm)
        due_s = self._audio_anchor.place(pts_s, now - held_s)
        if self.mic is not None:
            self.mic.write(pcm)
        if self.recorder is not None and self.started_s is not None and self.failed is None:
            try:
                self.recorder.write_audio(pcm, due_s - self.started_s)
            except SINK_ERRORS as exc:
                self._fail(exc)

    # ------------------------------------------------------------------ end

    def _fail(self, exc: BaseException) -> None:
        """A sink failed: stop writing (once), and say so."""
        if self.failed is None:
            self.failed = exc
            if self._on_fatal is not None:
                self._on_fatal(exc)

    async def close(self) -> None:
        """Stop feeding, then release the camera, the recording and the microphone."""
        if self._filler is not None:
            self._filler.cancel()
            await asyncio.gather(self._filler, return_exceptions=True)
        for sink in (self.camera, self.recorder):
            if sink is not None:
                sink.close()
        self.camera = self.recorder = None
        if self.mic is not None:
            await self.mic.close()
