"""One session's playout clock: which stream time the outgoing audio and video show at a wall time.

Both outgoing tracks ask the same clock, so the user's returned voice and the frames made from it
leave the server together (browsers line tracks up by the send times in RTCP sender reports).
"""
from __future__ import annotations

from collections import deque

import numpy as np


class PlayoutClock:
    """Maps wall time to stream time: `stream_t = min(wall - anchor - delay, ready_until)`.

    `anchor` is when stream time 0 arrived (the earliest arrival seen over a sliding window, so slow
    drift between the browser's sample clock and ours is followed). `delay` is the audio->video
    latency: unknown (nothing plays) until the first clip (or its first part) is ready, then the
    largest recent generation latency plus a margin; it falls gently when the model is ahead.

    The clock never runs past the video that is ready (`ready_until`, the end of the contiguous frames
    queued so far): when the next part is late, stream time stands still, so the video waits on its
    last frame and the returned voice waits in silence at the same stream time, and both go on together
    when the part arrives. The time stood still is added to the delay, and a rise of the delay (a late
    part raises the target to its latency plus the margin) is played the same way, as a hold, never as
    a step back in stream time: what was shown is never shown again.
    """

    def __init__(self, margin_s: float, anchor_window_s: float = 10.0, latency_history: int = 8,
                 max_fall_per_clip_s: float = 0.05) -> None:
        self.margin_s = margin_s
        self._anchor_window_s = anchor_window_s
        self._anchor_candidates: deque[tuple[float, float]] = deque()  # (arrival wall, anchor), anchors rising
        self._latencies_s: deque[float] = deque(maxlen=latency_history)
        self._max_fall_per_clip_s = max_fall_per_clip_s
        self.delay_s: float | None = None
        self.last_latency_s: float | None = None
        self._hold: tuple[float, float] | None = None  # (wall, stream time): stands still from there while the delay rises
        self._ready_until_s: float | None = None  # stream time where the contiguous ready video ends
        self._ready_ahead: list[tuple[float, float]] = []  # ready ranges past a range still being made

    @property
    def anchor_s(self) -> float | None:
        return self._anchor_candidates[0][1] if self._anchor_candidates else None

    @property
    def ready_until_s(self) -> float | None:
        """Stream time up to which video is ready (or known to have none); playout stops there."""
        return self._ready_until_s

    def note_audio(self, stream_end_s: float, arrival_wall_s: float) -> None:
        """Audio up to `stream_end_s` arrived at `arrival_wall_s` (monotonic seconds)."""
        anchor = arrival_wall_s - stream_end_s
        # monotonic deque: a sliding-window minimum in O(1) per frame
        while self._anchor_candidates and self._anchor_candidates[-1][1] >= anchor:
            self._anchor_candidates.pop()
        self._anchor_candidates.append((arrival_wall_s, anchor))
        while arrival_wall_s - self._anchor_candidates[0][0] > self._anchor_window_s:
            self._anchor_candidates.popleft()

    def note_clip_ready(self, clip_t0_s: float, clip_end_s: float, ready_wall_s: float,
                        first_part: bool = True) -> float | None:
        """A clip (or a part of one) covering stream time [`clip_t0_s`, `clip_end_s`) is ready; update the delay.

        Returns its latency. Parts of one clip count as one clip: the first part (the viewer's first
        frame) opens the clip's latency entry and lets the delay fall a step; a later part can only
        raise that entry, so every part plays in time and the delay falls per clip as it always did.
        """
        anchor = self.anchor_s
        if anchor is None:
            return None
        self._settle(ready_wall_s)
        self._add_ready(clip_t0_s, clip_end_s)
        latency_s = ready_wall_s - anchor - clip_t0_s
        fall_s = 0.0
        if first_part or not self._latencies_s:
            self.last_latency_s = latency_s
            self._latencies_s.append(latency_s)
            fall_s = self._max_fall_per_clip_s
        else:
            self._latencies_s[-1] = max(self._latencies_s[-1], latency_s)
        target_s = max(self._latencies_s) + self.margin_s
        if self.delay_s is None:
            self.delay_s = target_s
        elif target_s > self.delay_s:
            now_t = self._unheld_time(ready_wall_s)
            self._hold = (ready_wall_s, min(now_t, self._ready_until_s))
            self.delay_s = target_s
        else:
            self.delay_s = max(target_s, self.delay_s - fall_s)
        return latency_s

    def note_no_video(self, t0_s: float, end_s: float, wall_s: float) -> None:
        """No video will come for stream time [`t0_s`, `end_s`) (a dropped or failed clip): play through it."""
        self._settle(wall_s)
        self._add_ready(t0_s, end_s)

    def stream_time_at(self, wall_s: float) -> float | None:
        """Stream time that plays at `wall_s`, or None before the first clip sets the delay."""
        times = self.stream_times_at(np.array([wall_s], dtype=np.float64))
        return None if times is None else float(times[0])

    def stream_times_at(self, walls_s: np.ndarray) -> np.ndarray | None:
        """`stream_time_at` for many wall times at once (the audio track asks once per sample)."""
        if self.anchor_s is None or self.delay_s is None:
            return None
        times = self._unheld_time(walls_s)
        if self._ready_until_s is not None:
            times = np.minimum(times, self._ready_until_s)
        return times

    def delay_at(self, wall_s: float) -> float | None:
        """The delay the viewer sees at `wall_s`, counting a stall still going on."""
        t = self.stream_time_at(wall_s)
        return None if t is None else wall_s - self.anchor_s - t

    def _unheld_time(self, walls_s):
        """Stream time by the delay alone (no ready limit); a delay rise stands still instead of going back."""
        times = walls_s - self.anchor_s - self.delay_s
        if self._hold is not None:
            hold_wall_s, hold_t = self._hold
            times = np.maximum(times, np.minimum(hold_t, hold_t + walls_s - hold_wall_s))
        return times

    def _settle(self, wall_s: float) -> None:
        """Before the ready range grows at `wall_s`: a stall going on becomes part of the delay, so
        playout resumes from where it stood, not from where the wall clock has got to."""
        if self.delay_s is None or self._ready_until_s is None or self.anchor_s is None:
            return
        unheld_t = float(self._unheld_time(wall_s))
        if unheld_t > self._ready_until_s:
            self.delay_s = wall_s - self.anchor_s - self._ready_until_s
            self._hold = None

    def _add_ready(self, t0_s: float, end_s: float) -> None:
        eps = 1e-6
        if self._ready_until_s is None:
            self._ready_until_s = t0_s
        self._ready_ahead.append((t0_s, end_s))
        self._ready_ahead.sort()
        while self._ready_ahead and self._ready_ahead[0][0] <= self._ready_until_s + eps:
            self._ready_until_s = max(self._ready_until_s, self._ready_ahead.pop(0)[1])
