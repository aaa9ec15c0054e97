"""Outgoing media: the avatar video paced at the model's fps, and the user's voice delayed to match it.

Both tracks pick what to send by asking the session's `PlayoutClock` which stream time plays now;
pacing lives here and nowhere else. Nothing in `recv` waits on the model.
"""
from __future__ import annotations

import asyncio
import dataclasses
import fractions
import math
import time
from collections import deque

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from model.io_types import VideoClip
from server.playout import PlayoutClock

VIDEO_CLOCK_RATE = 90000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
AUDIO_OUT_RATE_HZ = 48000
AUDIO_PTIME_S = 0.020
MAX_LAG_S = 0.5  # further behind schedule than this (a stalled loop), skip ahead instead of bursting


class _Pacer:
    """Wall-clock schedule of a track's frames: tick n is due at start + n * period."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.index = -1
        self._start_s = 0.0

    @property
    def start_s(self) -> float | None:
        """Wall time (monotonic seconds) of tick 0, whose frame has pts 0; None before the first tick."""
        return self._start_s if self.index >= 0 else None

    async def next_tick(self) -> float:
        """Sleep until the next frame is due; return its scheduled wall time (monotonic seconds)."""
        now = time.monotonic()
        if self.index < 0:
            self._start_s = now
            self.index = 0
            return now
        self.index += 1
        due = self._start_s + self.index * self.period_s
        if now - due > MAX_LAG_S:
            skipped = int((now - due) / self.period_s)
            self.index += skipped
            due = self._start_s + self.index * self.period_s
        if due > now:
            await asyncio.sleep(due - now)
        return due


class AvatarVideoTrack(MediaStreamTrack):
    """The avatar: clip frames at the stream time the clock says plays now, idle frames otherwise.

    A clip may come in parts; each is queued and played by its own t0 exactly like a whole clip, so
    frames flow across parts and clips without a seam. When the clock stands still at the end of the
    ready video (the next part is late) the last frame is held: the avatar pauses mid-word, as the
    returned voice does, instead of jumping to the reference pose and back. Idle frames fill the time
    before the first clip, a true gap (a dropped clip, with later video queued) and a hold longer than
    `max_hold_s` (the clips stopped coming). Before the first clip they breathe on the reference; once
    the model has made a frame they breathe on the last frame it made, so a late or dropped clip never
    swaps the generated face for the crisp reference and back.
    """

    kind = "video"

    def __init__(self, clock: PlayoutClock, reference_rgb: np.ndarray, fps: float,
                 breath_period_s: float = 4.0, breath_depth: float = 0.04, max_hold_s: float = 3.0) -> None:
        super().__init__()
        self._clock = clock
        self._idle_base = reference_rgb.astype(np.float32)
        self.fps = fps
        self.frame_size = reference_rgb.shape[:2]  # (height, width)
        self._pacer = _Pacer(1.0 / fps)
        self._clips: deque[VideoClip] = deque()
        self._breath_period_s = breath_period_s
        self._breath_depth = breath_depth
        self._max_hold_frames = round(max_hold_s * fps)
        self._last_rgb: np.ndarray | None = None
        self._held_frames = 0  # frames the current hold has lasted
        self.frames_sent = 0
        self.clip_frames_sent = 0
        self.held_frames_sent = 0
        self.idle_frames_sent = 0

    def add_clip(self, clip: VideoClip) -> None:
        """Queue a finished clip or a part of one (each stamped with its own t0); they arrive in stream order."""
        if clip.frames.shape[1:3] != self.frame_size:
            raise ValueError(f"clip frames are {clip.frames.shape[1:3]}, the track sends {self.frame_size}")
        self._clips.append(clip)

    @property
    def queued_clips(self) -> int:
        """Clips, or parts of clips, waiting to play."""
        return len(self._clips)

    @property
    def pts_origin_s(self) -> float | None:
        """Wall time (monotonic seconds) at which the frame with pts 0 was due (None before the first)."""
        return self._pacer.start_s

    def drop_from(self, stream_t: float) -> None:
        """Forget every queued frame made for stream time `stream_t` or later (speech interrupted there)."""
        kept: deque[VideoClip] = deque()
        for clip in self._clips:
            if clip.t0 >= stream_t:
                continue
            keep = int(np.ceil((stream_t - clip.t0) * clip.fps - 1e-6))
            kept.append(clip if keep >= len(clip.frames) else dataclasses.replace(clip, frames=clip.frames[:keep]))
        self._clips = kept
        self._last_rgb = None  # past the cut the avatar idles; it does not hold the interrupted frame

    def _clip_frame_at(self, stream_t: float) -> np.ndarray | None:
        while self._clips and self._clips[0].t0 + self._clips[0].duration_s <= stream_t:
            self._clips.popleft()  # already played (or too late to show)
        if not self._clips or self._clips[0].t0 > stream_t:
            return None
        clip = self._clips[0]
        index = min(int((stream_t - clip.t0) * clip.fps + 1e-6), len(clip.frames) - 1)
        return clip.frames[index]

    def idle_frame(self, wall_s: float) -> np.ndarray:
        """The last generated frame (the reference before the first clip), slowly brightening and dimming,
        so a waiting avatar looks alive and keeps the look the viewer has been seeing."""
        gain = 1.0 + self._breath_depth * math.sin(2 * math.pi * wall_s / self._breath_period_s)
        base = self._idle_base if self._last_rgb is None else self._last_rgb.astype(np.float32)
        return np.clip(base * gain, 0, 255).astype(np.uint8)

    def frame_at(self, wall_s: float) -> np.ndarray:
        """The frame to send at `wall_s` (counted in the clip/held/idle totals)."""
        stream_t = self._clock.stream_time_at(wall_s)
        # the frame stays on screen for the next 1/fps: show the one made for the middle of that time
        rgb = self._clip_frame_at(stream_t + 0.5 / self.fps) if stream_t is not None else None
        if rgb is not None:
            self._last_rgb, self._held_frames = rgb, 0
            self.clip_frames_sent += 1
            return rgb
        waiting = self._last_rgb is not None and not self._clips  # nothing queued past now: the next part is late
        if waiting and self._held_frames < self._max_hold_frames:
            self._held_frames += 1
            self.held_frames_sent += 1
            return self._last_rgb
        self.idle_frames_sent += 1
        return self.idle_frame(wall_s)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        wall_s = await self._pacer.next_tick()
        rgb = self.frame_at(wall_s)
        self.frames_sent += 1
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = round(self._pacer.index * VIDEO_CLOCK_RATE / self.fps)
        frame.time_base = VIDEO_TIME_BASE
        return frame


class SyncedAudioTrack(MediaStreamTrack):
    """The user's own voice sent back, read at the clock's stream time so it lands with its frames.

    Every output sample asks the clock which stream time plays at its wall time: while the stream time
    advances the voice plays from there, while it stands still (the video waits for a late part, or a
    delay rise is held) silence is sent, and when it jumps ahead (the delay fell) the read position
    skips ahead; so the returned voice never drifts from the video by more than `tolerance_s`.
    """

    kind = "audio"

    def __init__(self, clock: PlayoutClock, buffer_s: float = 30.0, tolerance_s: float = 0.005) -> None:
        super().__init__()
        self._clock = clock
        self._rate_hz = AUDIO_OUT_RATE_HZ
        self._frame_samples = int(AUDIO_PTIME_S * self._rate_hz)
        self._pacer = _Pacer(AUDIO_PTIME_S)
        self._ring = np.zeros(int(buffer_s * self._rate_hz), dtype=np.int16)
        self._written_until = 0  # stream sample index one past the newest sample stored
        self._cursor: int | None = None  # next stream sample to send
        self._tolerance = int(tolerance_s * self._rate_hz)
        self._mixdown = av.AudioResampler(format="s16", layout="mono", rate=self._rate_hz)
        self.frames_sent = 0

    @property
    def pts_origin_s(self) -> float | None:
        """Wall time (monotonic seconds) at which the frame with pts 0 was due (None before the first)."""
        return self._pacer.start_s

    def silence_from(self, stream_t: float) -> None:
        """Silence what is stored from stream time `stream_t` on (speech interrupted there)."""
        start = max(round(stream_t * self._rate_hz), self._written_until - len(self._ring), 0)
        if start < self._written_until:
            self._ring[np.arange(start, self._written_until) % len(self._ring)] = 0

    def push(self, frame: av.AudioFrame) -> None:
        """Store an incoming frame (any rate/layout) at its stream time."""
        for out in self._mixdown.resample(frame):
            pcm = out.to_ndarray().reshape(-1)
            start = round(float(out.pts * out.time_base) * self._rate_hz) if out.pts is not None \
                else self._written_until
            self._write(start, pcm)

    def _write(self, start: int, pcm: np.ndarray) -> None:
        size = len(self._ring)
        if start > self._written_until:  # a gap in the stream: clear what the ring held there
            gap = min(start - self._written_until, size)
            idx = np.arange(start - gap, start) % size
            self._ring[idx] = 0
        if len(pcm) > size:
            start, pcm = start + len(pcm) - size, pcm[-size:]
        idx = np.arange(start, start + len(pcm)) % size
        self._ring[idx] = pcm
        self._written_until = max(self._written_until, start + len(pcm))

    def _read(self, start: int, count: int) -> np.ndarray:
        out = np.zeros(count, dtype=np.int16)
        lo = max(start, self._written_until - len(self._ring), 0)
        hi = min(start + count, self._written_until)
        if hi > lo:
            out[lo - start:hi - start] = self._ring[np.arange(lo, hi) % len(self._ring)]
        return out

    def _next_samples(self, wall_s: float) -> np.ndarray:
        n = self._frame_samples
        walls = wall_s + np.arange(n + 1) / self._rate_hz
        stream_t = self._clock.stream_times_at(walls)
        if stream_t is None:
            return np.zeros(n, dtype=np.int16)
        position = stream_t * self._rate_hz  # stream sample at each output sample's wall time
        running = np.flatnonzero(np.diff(position) > 0.5)  # output samples during which the stream advances
        pcm = np.zeros(n, dtype=np.int16)
        if not len(running):
            return pcm  # the stream stands still: silence
        wanted = round(position[running[0]])
        if self._cursor is None or wanted - self._cursor > self._tolerance:
            self._cursor = wanted  # first audio, or the delay shrank: skip ahead
        elif self._cursor - wanted > self._tolerance:  # the stream stepped back: wait in silence until it is here
            running = running[self._cursor - wanted:]
        pcm[running] = self._read(self._cursor, len(running))
        self._cursor += len(running)
        return pcm

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        wall_s = await self._pacer.next_tick()
        pcm = self._next_samples(wall_s)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._rate_hz
        frame.pts = self._pacer.index * self._frame_samples
        frame.time_base = fractions.Fraction(1, self._rate_hz)
        self.frames_sent += 1
        return frame
