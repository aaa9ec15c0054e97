"""Browser audio frames -> model windows on the RTP clock; the returned voice follows the playout clock."""
from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

from server.audio_window import AudioWindowCutter
from server.playout import PlayoutClock
from server.tracks import SyncedAudioTrack


def opus_like_frames(seconds: float, samples_per_frame: int, skip: range = range(0)) -> list[av.AudioFrame]:
    """48 kHz stereo s16 frames of a 440 Hz tone, as aiortc decodes them; frames in `skip` are lost."""
    frames = []
    for i in range(int(seconds * 48000 / samples_per_frame)):
        if i in skip:
            continue
        t = (i * samples_per_frame + np.arange(samples_per_frame)) / 48000
        tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(tone, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, i * samples_per_frame, fractions.Fraction(1, 48000)
        frames.append(frame)
    return frames


def test_windows_follow_the_rtp_clock_across_frame_sizes_and_lost_packets():
    cutter = AudioWindowCutter(sample_rate_hz=16000, clip_samples=12000, context_samples=16000)
    # 2.5 s in 10 ms frames with 0.2 s lost in the middle: still 3 whole clips on the stream grid
    windows = [w for f in opus_like_frames(2.5, 480, skip=range(100, 120)) for w in cutter.push(f)]
    assert [w.clip_index for w in windows] == [0, 1, 2]
    assert [round(w.t0, 4) for w in windows] == [0.0, 0.75, 1.5]
    for w in windows:
        assert w.samples.dtype == np.float32 and len(w.samples) == 28000 and w.new_from == 16000
    lost = windows[1].samples[16000 + 4000 + 100:16000 + 7200 - 100]  # 1.0..1.2 s, inside clip 1
    assert np.abs(lost).max() < 1e-3, "lost packets become silence, not shifted audio"
    assert np.abs(windows[1].new_samples[:3000]).max() > 0.2  # the tone itself is there


def test_returned_voice_waits_for_the_first_clip_then_plays_from_stream_start():
    clock = PlayoutClock(margin_s=0.1)
    track = SyncedAudioTrack(clock)
    for frame in opus_like_frames(1.0, 960):
        track.push(frame)
    clock.note_audio(1.0, arrival_wall_s=101.0)  # stream time 0 arrived at wall 100
    assert not track._next_samples(100.5).any(), "silence until a clip sets the delay"
    clock.note_clip_ready(0.0, 0.75, ready_wall_s=100.9)  # latency 0.9 s -> delay 1.0 s
    assert clock.delay_s == pytest.approx(1.0)
    first = track._next_samples(101.0)  # plays stream time 0
    expected = (8000 * np.sin(2 * np.pi * 440 * np.arange(960) / 48000)).astype(np.int16)
    assert np.abs(first.astype(int) - expected).max() <= 2
    # a later, slower clip raises the delay: the voice pauses (silence) instead of jumping
    clock.note_clip_ready(0.75, 1.5, ready_wall_s=101.0 + 1.0)  # latency 1.25 s -> delay 1.35 s
    assert clock.delay_s == pytest.approx(1.35)
    assert not track._next_samples(102.02).any()


def test_with_lookahead_a_clip_leaves_once_the_audio_after_it_is_in():
    """model.audio_encoder.lookahead_s: the same clips, each window also holding the next 160 ms, so each
    leaves 160 ms of stream later (the latency it costs)."""
    plain = AudioWindowCutter(sample_rate_hz=16000, clip_samples=12000, context_samples=16000)
    ahead = AudioWindowCutter(sample_rate_hz=16000, clip_samples=12000, context_samples=16000,
                              lookahead_samples=2560)
    frames = opus_like_frames(1.0, 480)  # 10 ms frames
    ahead_again = AudioWindowCutter(16000, 12000, 16000, 2560)
    first_plain = next(i for i, f in enumerate(frames) if plain.push(f))
    first_ahead = next(i for i, f in enumerate(frames) if ahead.push(f))
    assert first_ahead - first_plain == 16  # 16 more 10 ms frames: 160 ms of stream later
    assert 74 <= first_plain <= 76  # 0.75 s in (the resampler holds back a few samples)
    windows = [w for f in frames for w in ahead_again.push(f)]
    assert windows[0].lookahead == 2560 and len(windows[0].new_samples) == 12000
