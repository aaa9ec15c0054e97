"""A late part stalls the shared playout clock: the video waits on its last frame and the returned voice
waits in silence over exactly the same wall time, then both go on together from the late part's t0.

Deterministic: the tracks' pacers are fake (ticks at fixed wall times, no sleeping), every audio sample
carries its own stream index and every video frame its own frame number, so what was sent at which wall
time is read back exactly.
"""
from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

from model.io_types import VideoClip
from server.playout import PlayoutClock
from server.tracks import AUDIO_OUT_RATE_HZ, VIDEO_CLOCK_RATE, AvatarVideoTrack, SyncedAudioTrack

RATE = AUDIO_OUT_RATE_HZ
FPS = 16.0
PART_FRAMES = 6  # 0.375 s
PART_S = PART_FRAMES / FPS
ANCHOR = 100.0  # stream time 0 arrived at this wall time
MARGIN = 0.1
REFERENCE_VALUE = 200  # idle frames before the first clip are this grey, breathing by a few levels


class FakePacer:
    """Tick n at start + n * period, at once."""

    def __init__(self, start_s: float, period_s: float) -> None:
        self.start_s, self.period_s, self.index = start_s, period_s, -1

    def wall(self, index: int) -> float:
        return self.start_s + index * self.period_s

    async def next_tick(self) -> float:
        self.index += 1
        return self.wall(self.index)


def stream_index_audio(seconds: float) -> list[av.AudioFrame]:
    """48 kHz mono frames whose sample i holds (i % 30000) + 1: a played sample says which stream sample it is."""
    frames = []
    for start in range(0, int(seconds * RATE), 960):
        pcm = (np.arange(start, start + 960) % 30000 + 1).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, start, fractions.Fraction(1, RATE)
        frames.append(frame)
    return frames


def part(index: int) -> VideoClip:
    """Part `index` of the stream (6 frames); frame k of the stream is a flat image of value 10 * (k + 1)."""
    first = index * PART_FRAMES
    values = 10 * (np.arange(first, first + PART_FRAMES) + 1)
    frames = np.broadcast_to(values[:, None, None, None], (PART_FRAMES, 8, 8, 3)).astype(np.uint8)
    return VideoClip(frames, t0=first / FPS, fps=FPS, clip_index=index // 2, offset=(index % 2) * PART_FRAMES,
                     final=index % 2 == 1)


def frame_number(rgb: np.ndarray) -> int | None:
    """The stream frame an image shows, or None for an idle (reference) frame."""
    value = int(rgb[0, 0, 0])
    return None if value > 150 else round(value / 10) - 1  # (a breathing idle frame is within 4% of it)


def make_tracks(latency_history: int = 8) -> tuple[PlayoutClock, AvatarVideoTrack, SyncedAudioTrack]:
    clock = PlayoutClock(margin_s=MARGIN, latency_history=latency_history, max_fall_per_clip_s=0.05)
    video = AvatarVideoTrack(clock, np.full((8, 8, 3), REFERENCE_VALUE, np.uint8), FPS)
    audio = SyncedAudioTrack(clock)
    video._pacer = FakePacer(ANCHOR, 1 / FPS)
    audio._pacer = FakePacer(ANCHOR, 0.02)
    for frame in stream_index_audio(4.0):  # all the mic audio is in (only the clock decides what plays)
        audio.push(frame)
    clock.note_audio(4.0, arrival_wall_s=ANCHOR + 4.0)
    return clock, video, audio


async def play(clock, video, audio, until_wall_s: float, arrivals: list[tuple[float, VideoClip]]):
    """Run both tracks in wall-time order up to `until_wall_s`, handing each part over at its wall time
    (as Session._play_part does). Returns the audio (one int16 per output sample from ANCHOR on) and the
    video frames sent, as (wall, pts, frame number, stream time then)."""
    events = [(wall, 0, p) for wall, p in arrivals]
    events += [(video._pacer.wall(i), 1, None) for i in range(int((until_wall_s - ANCHOR) * FPS))]
    events += [(audio._pacer.wall(i), 2, None) for i in range(int((until_wall_s - ANCHOR) / 0.02))]
    pcm, shown, audio_pts = [], [], []
    for wall, kind, clip in sorted(events, key=lambda e: (e[0], e[1])):
        if kind == 0:
            clock.note_clip_ready(clip.t0, clip.t0 + clip.duration_s, wall, first_part=clip.offset == 0)
            video.add_clip(clip)
        elif kind == 1:
            frame = await video.recv()
            shown.append((wall, frame.pts, frame_number(frame.to_ndarray(format="rgb24")),
                           clock.stream_time_at(wall)))
        else:
            frame = await audio.recv()
            audio_pts.append(frame.pts)
            pcm.append(frame.to_ndarray().reshape(-1))
    assert np.diff(audio_pts).tolist() == [960] * (len(audio_pts) - 1), "audio pts must run on without a gap"
    assert np.diff([s[1] for s in shown]).tolist() == [VIDEO_CLOCK_RATE // FPS] * (len(shown) - 1), \
        "video pts must step one frame at a time"
    return np.concatenate(pcm), shown


def played_stream_sample(pcm: np.ndarray) -> np.ndarray:
    """Stream sample index (mod 30000) each output sample played, -1 for silence."""
    return pcm.astype(np.int64) - 1


async def test_a_late_part_stalls_video_and_voice_together():
    clock, video, audio = make_tracks()
    # part 0 is ready 0.5 s after its audio: delay 0.6 s, so stream 0 plays at wall 100.6.
    # part 1 (stream 0.375 s) should play at 100.975 but is ready only at 101.31: the clock stands still
    # at 0.375 from 100.975, and after the part arrives holds the margin more (its latency 0.935 s + 0.1).
    arrive_1 = 101.31
    resume = arrive_1 + MARGIN
    pcm, shown = await play(clock, video, audio, 101.75, [(100.5, part(0)), (arrive_1, part(1))])
    stall_start = ANCHOR + 0.6 + PART_S
    assert clock.delay_s == pytest.approx(arrive_1 - ANCHOR - PART_S + MARGIN)
    assert clock.delay_at(101.6) == pytest.approx(resume - ANCHOR - PART_S)
    assert clock.delay_at(102.0) == pytest.approx(102.0 - ANCHOR - 2 * PART_S), "part 2 is late too: a stall"

    # the clock, as the video ticks saw it: advancing, standing still over [stall_start, resume], then
    # advancing again from the same point
    for wall, _, _, t in shown:
        if ANCHOR + 0.6 <= wall <= stall_start:
            assert t == pytest.approx(wall - ANCHOR - 0.6)
        elif stall_start <= wall <= resume:
            assert t == pytest.approx(PART_S), f"the clock must stand still at {wall:.3f}"
        elif wall > resume:
            assert t == pytest.approx(PART_S + wall - resume)

    # the voice: silence before stream 0, then stream samples 0.. in order up to part 1's t0, silence
    # exactly while the clock stands still, then on from part 1's t0 with nothing skipped or repeated
    played = played_stream_sample(pcm)
    start_m, stall_m, resume_m = (round((w - ANCHOR) * RATE) for w in (ANCHOR + 0.6, stall_start, resume))
    assert (played[:start_m] == -1).all()
    assert played[start_m:stall_m].tolist() == list(range(stall_m - start_m))
    assert (played[stall_m:resume_m] == -1).all(), "the voice must wait in silence while the video waits"
    resumed = played[resume_m:]
    assert resumed[0] == round(PART_S * RATE), "the voice resumes at the late part's first sample"
    assert (np.diff(resumed) % 30000 == 1).all()  # (the index wraps at 30000)

    # the video: idle before stream 0; part 0's frames; its last frame held while the clock stands
    # still; part 1's first frame from its arrival (the stream time it stands at is that frame's);
    # then each frame at its stream time
    for wall, _, number, t in shown:
        if wall < ANCHOR + 0.6:
            assert number is None, f"idle frames before the first clip, got frame {number} at {wall:.3f}"
        elif wall < stall_start:
            assert number == int(t * FPS + 0.5)
        elif wall < arrive_1:
            assert number == PART_FRAMES - 1, f"the last ready frame is held at {wall:.3f}, got {number}"
        else:
            assert number == int(t * FPS + 0.5), f"at {wall:.3f}"
    first_late_wall, _, _, first_late_t = next(s for s in shown if s[2] == PART_FRAMES)
    assert arrive_1 <= first_late_wall < arrive_1 + 1 / FPS
    # the first late frame is on screen when its audio (stream 0.375 s on) starts to play, at the same stream time
    on_screen_at_resume = [s[2] for s in shown if s[0] <= resume][-1]
    assert on_screen_at_resume == PART_FRAMES
    assert first_late_t == pytest.approx(PART_S) == played[resume_m] / RATE
    assert video.held_frames_sent > 0 and video.idle_frames_sent == sum(s[2] is None for s in shown)


async def test_early_parts_play_without_a_stall_and_the_delay_falls_per_clip():
    clock, video, audio = make_tracks(latency_history=1)
    arrivals = [(100.5, part(0)), (100.7, part(1)), (101.1, part(2)), (101.3, part(3))]  # all ahead of time
    pcm, shown = await play(clock, video, audio, 102.0, arrivals)
    played = played_stream_sample(pcm)
    first = int(np.argmax(played >= 0))
    # clip 1's first part was ready 0.35 s after its audio: the delay falls one step (0.05 s) at once,
    # and that is the only break in the voice: a skip ahead of 0.05 s, no silence
    voiced = played[first:]
    steps = np.diff(voiced) % 30000
    assert set(steps.tolist()) == {1, round(0.05 * RATE) + 1}
    assert clock.delay_s == pytest.approx(0.55)
    numbers = [s[2] for s in shown if s[2] is not None]
    assert video.held_frames_sent == 0 and numbers == sorted(numbers)


async def test_a_dropped_clip_is_played_through_on_the_last_generated_frame():
    clock, video, audio = make_tracks()
    arrivals = [(100.5, part(0)), (100.7, part(1))]
    _pcm, shown = await play(clock, video, audio, 101.5, arrivals)
    last_made = [s[2] for s in shown if s[2] is not None][-1]
    clock.note_no_video(0.75, 1.5, 101.5)  # clip 1 dropped: its time plays without video, not as a stall
    late = part(4)  # clip 2 arrives at once
    clock.note_clip_ready(late.t0, late.t0 + late.duration_s, 101.5)
    video.add_clip(late)
    t = clock.stream_time_at(101.6)
    assert 0.75 < t < 1.5
    idle = video.frame_at(101.6)
    # the dropped clip's time breathes on the last frame the model made, not on the reference
    assert frame_number(idle) is not None, "a dropped clip must not swap in the reference"
    assert abs(int(idle[0, 0, 0]) - 10 * (last_made + 1)) <= 0.05 * 10 * (last_made + 1) + 1
    assert video.idle_frames_sent == sum(s[2] is None for s in shown) + 1


async def test_clips_that_stop_coming_leave_the_last_generated_frame_not_the_reference():
    clock, video, audio = make_tracks()
    _pcm, shown = await play(clock, video, audio, 106.0, [(100.5, part(0))])  # part 1 never comes
    after_first = [s for s in shown if s[0] >= ANCHOR + 0.6]
    assert after_first and all(s[2] is not None for s in after_first), \
        "once a frame was made, neither a stall nor a hold past max_hold_s may show the reference"
    assert {s[2] for s in shown if s[0] >= ANCHOR + 0.6 + PART_S} == {PART_FRAMES - 1}
    assert video.idle_frames_sent > sum(s[2] is None for s in shown), "the hold outlasted max_hold_s"
