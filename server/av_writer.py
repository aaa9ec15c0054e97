"""Encode a session's output (H.264 + AAC) into one container with av: the recorder's fragmented MP4, the
RTMP push's FLV. It subscribes to `session.output` like any viewer, so it writes what viewers see, in sync.

Video and audio frames are placed by the wall time they were due at (`SessionOutput.wall_time_s`), the
clock both output tracks share, so their offset in the file is their offset on the wire. Encoding and
writing run on one thread of their own: a slow disk or a stalled RTMP socket never blocks the event loop
(frames that pile up meanwhile are dropped by the subscription, oldest first).
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any

import av

from server.output import SessionOutput

log = logging.getLogger(__name__)

AUDIO_RATE_HZ = 48000
AUDIO_TIME_BASE = Fraction(1, AUDIO_RATE_HZ)
MAX_QUEUED_FRAMES = 64  # frames of both kinds waiting for the writer thread


class AvContainerWriter:
    """One open container with an H.264 and an AAC stream; every call runs on the writer's thread."""

    def __init__(self, target: str, container_format: str, fps: float, frame_size: tuple[int, int],
                 gop_frames: int, options: dict[str, str] | None = None, timeout_s: float = 10.0) -> None:
        self._fps = Fraction(fps).limit_denominator(1001)
        self._container = av.open(target, mode="w", format=container_format, options=options or {},
                                  timeout=timeout_s)
        try:
            self._video = self._container.add_stream("libx264", rate=self._fps)
            self._video.height, self._video.width = frame_size
            self._video.pix_fmt = "yuv420p"
            self._video.options = {"preset": "veryfast", "tune": "zerolatency", "g": str(gop_frames),
                                   "keyint_min": str(gop_frames), "sc_threshold": "0", "bf": "0"}
            self._audio = self._container.add_stream("aac", rate=AUDIO_RATE_HZ, layout="mono")
        except BaseException:
            self._container.close()
            raise
        self._last_video_index = -1
        self._audio_next_pts: int | None = None
        self.video_frames = 0
        self.audio_samples = 0

    def write_video(self, frame: av.VideoFrame, t_s: float) -> None:
        """A frame due `t_s` seconds after the start (frames landing on an index already written are skipped)."""
        index = round(t_s * self._fps)
        if index <= self._last_video_index:
            return
        out = frame.reformat(format="yuv420p")  # the subscription's own copy (already yuv420p: no work)
        out.pts, out.time_base = index, 1 / self._fps
        self._container.mux(self._video.encode(out))
        self._last_video_index = index
        self.video_frames += 1

    def write_audio(self, frame: av.AudioFrame, t_s: float) -> None:
        """A frame due `t_s` seconds after the start; audio stays contiguous (AAC has no gaps) from its first pts."""
        if self._audio_next_pts is None:
            self._audio_next_pts = max(0, round(t_s * AUDIO_RATE_HZ))
        out = frame  # the subscription's own copy
        out.pts, out.time_base = self._audio_next_pts, AUDIO_TIME_BASE
        self._audio_next_pts += frame.samples
        self._container.mux(self._audio.encode(out))
        self.audio_samples += frame.samples

    def close(self) -> None:
        """Flush both encoders and close; for a fragmented MP4 the last fragment is written."""
        try:
            for stream in (self._video, self._audio):
                self._container.mux(stream.encode(None))
        finally:
            self._container.close()


class OutputRecorderTask:
    """Feeds a session's output to an `AvContainerWriter` made by `open_writer()` on a thread of its own.

    `run()` ends when the output ends or the task is cancelled; an error from the writer is raised from
    `run()` after the writer is closed (the RTMP push reconnects by calling `run()` again).
    """

    def __init__(self, output: SessionOutput, open_writer: Any, name: str) -> None:
        self._output = output
        self._open_writer = open_writer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.writer: AvContainerWriter | None = None

    async def run(self, on_open: Any = None) -> None:
        loop = asyncio.get_running_loop()
        self.writer = await loop.run_in_executor(self._executor, self._open_writer)
        if on_open is not None:
            on_open()
        video, audio = self._output.subscribe("video"), self._output.subscribe("audio")
        # bounded: a writer that falls behind makes the subscriptions drop their oldest frames, memory stays flat
        queue: asyncio.Queue[tuple[str, Any, float] | None] = asyncio.Queue(maxsize=MAX_QUEUED_FRAMES)
        origin_s: float | None = None

        async def read(track: Any) -> None:
            try:
                while True:
                    frame = await track.recv()
                    wall_s = self._output.wall_time_s(track.kind, frame)
                    if wall_s is not None:
                        await queue.put((track.kind, frame, wall_s))
            except Exception:  # noqa: BLE001 - MediaStreamError: the output ended
                await queue.put(None)

        readers = [asyncio.create_task(read(track)) for track in (video, audio)]
        try:
            while (item := await queue.get()) is not None:
                kind, frame, wall_s = item
                origin_s = wall_s if origin_s is None else origin_s
                t_s = wall_s - origin_s
                if t_s < 0:
                    continue  # the other kind's first frame was due earlier than this one
                write = self.writer.write_video if kind == "video" else self.writer.write_audio
                await loop.run_in_executor(self._executor, write, frame, t_s)
        finally:
            for reader in readers:
                reader.cancel()
            video.stop()
            audio.stop()
            writer, self.writer = self.writer, None
            await asyncio.shield(loop.run_in_executor(self._executor, _close_quietly, writer))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)


def _close_quietly(writer: AvContainerWriter) -> None:
    try:
        writer.close()
    except Exception:  # a dropped RTMP connection fails its flush; nothing more to save
        log.debug("container did not close cleanly", exc_info=True)
