"""The avatar's video and voice into an MP4 (H.264 + AAC), on one timeline: what a camera and a microphone
showed, second by second.

Both tracks are placed by the time they were due, counted from the recorder's start: a video frame at the
frame slot of its time, the voice contiguous while it flows, re-placed where it jumps (a reconnect), so
picture and sound stay in step in the file as they were live.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from client_cam.errors import ClientError
from client_cam.media_in import RATE_HZ

VIDEO_CRF = "20"
MAX_HELD_S = 10.0  # a longer gap (the machine slept) stays a gap in the file instead of copies of one frame
AUDIO_RESYNC_S = 0.03  # the voice is re-placed at its due time when it is this far off it


class Mp4Recorder:
    """Fixed size and fps, opened once the stream's are known; frames of another size are scaled."""

    def __init__(self, path: str | Path, width: int, height: int, fps: float) -> None:
        try:
            self._container = av.open(str(path), mode="w", format="mp4")
        except (av.error.FFmpegError, OSError) as exc:
            raise ClientError(f"--out {path}: cannot write it ({exc})") from None
        self._video = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        self._video.options = {"crf": VIDEO_CRF, "preset": "veryfast", "tune": "zerolatency"}
        self._audio = self._container.add_stream("aac", rate=RATE_HZ, layout="mono")
        self.width, self.height, self.fps = width, height, fps
        self.path = Path(path)
        self._last_pts = -1
        self._last_rgb: np.ndarray | None = None
        self.frames_written = 0
        self.frames_left_out = 0
        self.audio_samples_written = 0

    def write_video(self, rgb: np.ndarray, t_s: float) -> bool:
        """A frame shown from `t_s` seconds after the recording's start, from the first frame slot at or after it.

        The file has a constant frame rate: slots no frame came for hold the frame before. A frame whose
        slot is taken (a late frame after the stall filler wrote one there) is left out rather than pushed
        to a later slot: pushing would move every frame after it off its voice.
        """
        pts = math.ceil(t_s * self.fps - 1e-6)  # never before it was due, as a camera would show it
        if pts <= self._last_pts:
            self.frames_left_out += 1
            return False
        if rgb.shape[:2] != (self.height, self.width):
            rgb = np.asarray(Image.fromarray(rgb).resize((self.width, self.height), Image.BILINEAR))
        if self._last_rgb is not None and pts - self._last_pts <= MAX_HELD_S * self.fps:
            for held in range(self._last_pts + 1, pts):  # no frame came for these slots: the last one stays
                self._encode_video(self._last_rgb, held)
        self._encode_video(rgb, pts)
        self._last_rgb = rgb
        return True

    def _encode_video(self, rgb: np.ndarray, pts: int) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = pts
        self._container.mux(self._video.encode(frame))
        self._last_pts = pts
        self.frames_written += 1

    def write_audio(self, pcm: np.ndarray, t_s: float) -> None:
        """int16 mono 48 kHz heard from `t_s`: appended while the voice flows; re-placed at `t_s` (silence
        before it, or its overlap cut) when it is more than AUDIO_RESYNC_S off, as after a reconnect."""
        behind = round(t_s * RATE_HZ) - self.audio_samples_written
        if behind > AUDIO_RESYNC_S * RATE_HZ:
            self._encode_audio(np.zeros(behind, dtype=np.int16))
        elif -behind > AUDIO_RESYNC_S * RATE_HZ:
            pcm = pcm[-behind:]
        if len(pcm):
            self._encode_audio(pcm)

    def _encode_audio(self, pcm: np.ndarray) -> None:
        samples = (pcm.astype(np.float32) / 32768.0)[None]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout="mono")
        frame.sample_rate = RATE_HZ
        frame.pts = self.audio_samples_written
        self._container.mux(self._audio.encode(frame))
        self.audio_samples_written += len(pcm)

    def close(self) -> None:
        """Flush both encoders and write the index: the file plays anywhere after this."""
        try:
            self._container.mux(self._video.encode(None))
            self._container.mux(self._audio.encode(None))
        finally:
            self._container.close()
