"""ClipWindower: windows of context + clip, timestamps on the sample grid, any chunking."""
from __future__ import annotations

import numpy as np
import pytest

from model.stream.windowing import ClipWindower

SR = 16000
CLIP = 12000
CONTEXT = 16000


def ramp(n: int, start: int = 0) -> np.ndarray:
    return (np.arange(start, start + n) % 997).astype(np.float32) / 997.0


def collect(windower: ClipWindower, pcm: np.ndarray, chunk_sizes: list[int]) -> list:
    windows, pos, i = [], 0, 0
    while pos < len(pcm):
        n = chunk_sizes[i % len(chunk_sizes)]
        windows += windower.push(pcm[pos:pos + n])
        pos += n
        i += 1
    return windows


def test_first_window_has_silent_context_and_new_audio_after_it():
    w = ClipWindower(CLIP, CONTEXT, SR)
    pcm = ramp(CLIP)
    (window,) = w.push(pcm)
    assert window.samples.shape == (CONTEXT + CLIP,)
    assert window.samples.dtype == np.float32
    assert window.new_from == CONTEXT
    assert np.all(window.samples[:CONTEXT] == 0)
    np.testing.assert_array_equal(window.new_samples, pcm)
    assert window.t0 == 0.0 and window.clip_index == 0


def test_windows_do_not_depend_on_chunk_sizes():
    pcm = ramp(5 * CLIP + 123)
    whole = ClipWindower(CLIP, CONTEXT, SR).push(pcm)
    for sizes in ([1, 7, 320, 960], [CLIP + 1], [480]):
        chunked = collect(ClipWindower(CLIP, CONTEXT, SR), pcm, sizes)
        assert len(chunked) == len(whole) == 5
        for a, b in zip(whole, chunked):
            np.testing.assert_array_equal(a.samples, b.samples)
            assert (a.t0, a.clip_index, a.new_from) == (b.t0, b.clip_index, b.new_from)


def test_context_is_the_audio_just_before_the_clip():
    pcm = ramp(4 * CLIP)
    windows = ClipWindower(CLIP, CONTEXT, SR).push(pcm)
    for k, window in enumerate(windows[2:], start=2):
        start = k * CLIP
        np.testing.assert_array_equal(window.samples, pcm[start - CONTEXT:start + CLIP])
        assert window.t0 == pytest.approx(start / SR)
        assert window.clip_index == k


def test_stream_time_of_first_chunk_sets_t0():
    w = ClipWindower(CLIP, CONTEXT, SR)
    windows = w.push(ramp(2 * CLIP), t_s=12.5)
    assert [x.t0 for x in windows] == pytest.approx([12.5, 12.5 + CLIP / SR])


def test_gap_in_stream_time_is_filled_with_silence():
    w = ClipWindower(CLIP, 0, SR)
    w.push(np.ones(CLIP // 2, np.float32), t_s=0.0)
    (window,) = w.push(np.ones(CLIP // 4, np.float32), t_s=(CLIP * 3 // 4) / SR)
    expected = np.concatenate([np.ones(CLIP // 2), np.zeros(CLIP // 4), np.ones(CLIP // 4)])
    np.testing.assert_array_equal(window.samples, expected.astype(np.float32))


def test_overlapping_chunk_is_trimmed():
    w = ClipWindower(CLIP, 0, SR)
    w.push(np.ones(CLIP // 2, np.float32), t_s=0.0)
    late = np.full(CLIP, 2.0, np.float32)
    (window,) = w.push(late, t_s=(CLIP // 4) / SR)  # first CLIP//4 samples overlap
    assert np.all(window.samples[:CLIP // 2] == 1.0) and np.all(window.samples[CLIP // 2:] == 2.0)
    assert w.pending_samples == CLIP // 4


def test_flush_pads_the_last_partial_clip_with_silence():
    w = ClipWindower(CLIP, CONTEXT, SR)
    w.push(ramp(CLIP + 100))
    (last,) = w.flush()
    assert last.clip_index == 1
    assert np.all(last.new_samples[100:] == 0) and last.new_samples.shape == (CLIP,)
    assert w.flush() == []


def test_buffer_stays_bounded_over_a_long_stream():
    w = ClipWindower(CLIP, CONTEXT, SR)
    chunk = ramp(960)
    for _ in range(2000):
        w.push(chunk)
    assert w.pending_samples < CLIP
    assert w.next_clip_index == 2000 * 960 // CLIP


def test_stereo_input_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="mono"):
        ClipWindower(CLIP, CONTEXT, SR).push(np.zeros((10, 2), np.float32))


# ----------------------------------------------------------------------------- look-ahead

LOOKAHEAD = 2560  # 160 ms at 16 kHz


def test_lookahead_windows_carry_the_audio_after_the_clip_and_leave_that_much_later():
    pcm = ramp(3 * CLIP + LOOKAHEAD)
    plain = ClipWindower(CLIP, CONTEXT, SR)
    ahead = ClipWindower(CLIP, CONTEXT, SR, lookahead_samples=LOOKAHEAD)
    assert len(plain.push(pcm[:CLIP])) == 1
    assert ahead.push(pcm[:CLIP]) == []  # the clip is in, its look-ahead is not yet
    assert ahead.push(pcm[CLIP:CLIP + LOOKAHEAD - 1]) == []
    (first,) = ahead.push(pcm[CLIP + LOOKAHEAD - 1:CLIP + LOOKAHEAD])
    windows = [first, *ahead.push(pcm[CLIP + LOOKAHEAD:])]
    assert [w.clip_index for w in windows] == [0, 1, 2]
    for k, w in enumerate(windows):
        assert w.samples.shape == (CONTEXT + CLIP + LOOKAHEAD,) and w.lookahead == LOOKAHEAD
        np.testing.assert_array_equal(w.new_samples, pcm[k * CLIP:(k + 1) * CLIP])  # the clip is cut where it was
        np.testing.assert_array_equal(w.samples[-LOOKAHEAD:], pcm[(k + 1) * CLIP:(k + 1) * CLIP + LOOKAHEAD])
        assert w.t0 == pytest.approx(k * CLIP / SR)
    plain_windows = ClipWindower(CLIP, CONTEXT, SR).push(pcm)
    for a, b in zip(windows, plain_windows):  # the same clips and context as without look-ahead
        np.testing.assert_array_equal(a.samples[:CONTEXT + CLIP], b.samples)


def test_flush_pads_the_last_clip_and_its_lookahead_with_silence():
    w = ClipWindower(CLIP, CONTEXT, SR, lookahead_samples=LOOKAHEAD)
    pcm = ramp(CLIP + 100)  # one whole clip (its look-ahead short) and 100 samples of a second
    assert w.push(pcm) == []
    windows = w.flush()
    assert [x.clip_index for x in windows] == [0, 1]
    np.testing.assert_array_equal(windows[0].new_samples, pcm[:CLIP])
    np.testing.assert_array_equal(windows[0].samples[-LOOKAHEAD:][:100], pcm[CLIP:])
    assert not windows[0].samples[-LOOKAHEAD + 100:].any()
    np.testing.assert_array_equal(windows[1].new_samples[:100], pcm[CLIP:])
    assert not windows[1].new_samples[100:].any() and not windows[1].samples[-LOOKAHEAD:].any()
    assert w.flush() == []
    with pytest.raises(ValueError, match="lookahead_samples must be >= 0"):
        ClipWindower(CLIP, CONTEXT, SR, lookahead_samples=-1)
