"""One session's output, made once and handed to any number of consumers: `session.output.subscribe(kind)`.

The avatar's video and voice tracks are paced by whoever calls their `recv()`, so they may have one
reader only. `SessionOutput` is that reader: while anyone is subscribed, one pump per kind pulls the
track and gives every frame to each subscriber's `OutputTrack`. The browser's peer connection, every WHEP
viewer, the recorder, the RTMP push and a virtual camera all subscribe the same way, so adding a viewer
never adds generation, and all of them see the same frames. Each subscriber gets its own copy of every frame
(video as yuv420p, what encoders take): encoders run on threads of their own and PyAV frames are not safe to
convert from two threads at once. A slow subscriber loses its oldest frames, never the others'.

    track = session.output.subscribe("video")   # an aiortc MediaStreamTrack: pc.addTrack(track) or recv()
    ...
    track.stop()                                # unsubscribes

`wall_time_s(kind, frame)` turns a frame's pts into the monotonic wall time it was due at, the common
clock on which writers line video and audio up.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

log = logging.getLogger(__name__)

KINDS = ("video", "audio")
DEFAULT_MAX_QUEUED_FRAMES = {"video": 32, "audio": 100}  # 2 s of video at 16 fps, 2 s of 20 ms audio frames


def private_copy(frame: Any) -> Any:
    """A frame of one's own, made on the loop's thread (a video frame as yuv420p; pts and time base kept)."""
    if isinstance(frame, av.VideoFrame):
        copy = frame.reformat(format="yuv420p")
        if copy is frame:
            copy = av.VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")
    else:
        copy = av.AudioFrame.from_ndarray(frame.to_ndarray(), format=frame.format.name, layout=frame.layout.name)
        copy.sample_rate = frame.sample_rate
    copy.pts, copy.time_base = frame.pts, frame.time_base
    return copy


class OutputTrack(MediaStreamTrack):
    """One subscriber's view of a session's video or audio; `stop()` ends the subscription."""

    def __init__(self, output: SessionOutput, kind: str, max_queued_frames: int) -> None:
        super().__init__()
        self.kind = kind
        self._output = output
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._max_queued = max_queued_frames
        self.frames_dropped = 0  # lost because this subscriber read too slowly

    def deliver(self, frame: Any) -> None:
        """Called by the pump: queue a frame (None ends the track), dropping the oldest when full."""
        while frame is not None and self._queue.qsize() >= self._max_queued:
            self._queue.get_nowait()
            self.frames_dropped += 1
        self._queue.put_nowait(frame)

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._queue.get()
        if frame is None:
            super().stop()
            raise MediaStreamError
        return private_copy(frame)

    def stop(self) -> None:
        super().stop()
        self._output.unsubscribe(self)


class SessionOutput:
    """Fan-out of a session's output tracks (see the module docstring for the API)."""

    def __init__(self, video: MediaStreamTrack, audio: MediaStreamTrack) -> None:
        self._sources = {"video": video, "audio": audio}
        self._subscribers: dict[str, set[OutputTrack]] = {kind: set() for kind in KINDS}
        self._pumps: dict[str, asyncio.Task] = {}
        self._closed = False

    def subscribe(self, kind: str, max_queued_frames: int | None = None) -> OutputTrack:
        """A new track that gets every `kind` ("video" or "audio") frame from now on."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        track = OutputTrack(self, kind, max_queued_frames or DEFAULT_MAX_QUEUED_FRAMES[kind])
        if self._closed:
            track.deliver(None)
            return track
        self._subscribers[kind].add(track)
        if kind not in self._pumps:
            self._pumps[kind] = asyncio.get_running_loop().create_task(self._pump(kind), name=f"output-{kind}")
        return track

    def unsubscribe(self, track: OutputTrack) -> None:
        subscribers = self._subscribers[track.kind]
        subscribers.discard(track)
        if not subscribers and track.kind in self._pumps:
            self._pumps.pop(track.kind).cancel()  # nobody listens: the track is not pulled (no work)

    def subscribers(self, kind: str) -> int:
        return len(self._subscribers[kind])

    def wall_time_s(self, kind: str, frame: Any) -> float | None:
        """Monotonic wall time a frame of `kind` was due at (its pts on the track's pacing clock)."""
        origin = getattr(self._sources[kind], "pts_origin_s", None)
        if origin is None or frame.pts is None:
            return None
        return origin + float(frame.pts * frame.time_base)

    async def _pump(self, kind: str) -> None:
        source = self._sources[kind]
        try:
            while self._subscribers[kind]:
                try:
                    frame = await source.recv()
                except MediaStreamError:
                    break  # the session's track ended
                for track in list(self._subscribers[kind]):
                    track.deliver(frame)
        finally:
            if self._pumps.get(kind) is asyncio.current_task():
                del self._pumps[kind]
        for track in list(self._subscribers[kind]):
            track.deliver(None)

    async def close(self) -> None:
        """End every subscription (their recv raises MediaStreamError) and stop pulling the tracks."""
        self._closed = True
        pumps = list(self._pumps.values())
        self._pumps.clear()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for kind in KINDS:
            for track in list(self._subscribers[kind]):
                track.deliver(None)
            self._subscribers[kind].clear()
