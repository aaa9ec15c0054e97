"""One session's playout clock: which stream time the outgoing audio and video show at a wall time.

Both outgoing tracks ask the same clock, so the user's returned voice and the frames made from it
leave the server together (browsers line tracks up by the send times in RTCP sender reports).
"""
from __future__ import annotations

from collections import deque


class PlayoutClock:
    """Maps wall time to stream time: `stream_t = wall - anchor - delay`.

    `anchor` is when stream time 0 arrived (the earliest arrival seen over a sliding window, so slow
    drift between the browser's sample clock and ours is followed). `delay` is the audio->video
    latency: unknown (nothing plays) until the first clip (or its first part) is ready, then the
    largest recent generation latency plus a margin; it rises at once when a clip or a part of one is
    late and falls gently.
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

    @property
    def anchor_s(self) -> float | None:
        return self._anchor_candidates[0][1] if self._anchor_candidates else None

    def note_audio(self, stream_end_s: float, arrival_wall_s: float) -> None:
        """Audio up to `stream_end_s` arrived at `arrival_wall_s` (monotonic seconds)."""
        anchor = arrival_wall_s - stream_end_s
        # monotonic deque: a sliding-window minimum in O(1) per frame
        while self._anchor_candidates and self._anchor_candidates[-1][1] >= anchor:
            self._anchor_candidates.pop()
        self._anchor_candidates.append((arrival_wall_s, anchor))
        while arrival_wall_s - self._anchor_candidates[0][0] > self._anchor_window_s:
            self._anchor_candidates.popleft()

    def note_clip_ready(self, clip_t0_s: float, ready_wall_s: float, first_part: bool = True) -> float | None:
        """A clip (or a part of one) starting at stream time `clip_t0_s` is ready; update the delay.

        Returns its latency. Parts of one clip count as one clip: the first part (the viewer's first
        frame) opens the clip's latency entry and lets the delay fall a step; a later part can only
        raise that entry, so every part plays in time and the delay falls per clip as it always did.
        """
        anchor = self.anchor_s
        if anchor is None:
            return None
        latency_s = ready_wall_s - anchor - clip_t0_s
        fall_s = 0.0
        if first_part or not self._latencies_s:
            self.last_latency_s = latency_s
            self._latencies_s.append(latency_s)
            fall_s = self._max_fall_per_clip_s
        else:
            self._latencies_s[-1] = max(self._latencies_s[-1], latency_s)
        target_s = max(self._latencies_s) + self.margin_s
        if self.delay_s is None or target_s > self.delay_s:
            self.delay_s = target_s
        else:
            self.delay_s = max(target_s, self.delay_s - fall_s)
        return latency_s

    def stream_time_at(self, wall_s: float) -> float | None:
        """Stream time that plays at `wall_s`, or None before the first clip sets the delay."""
        anchor = self.anchor_s
        if anchor is None or self.delay_s is None:
            return None
        return wall_s - anchor - self.delay_s
