"""Clips in parts, end to end on the real tiny model: the engine hands each denoised block to the session
as soon as it exists, the playout plays parts by their t0 exactly like whole clips, and a clip still
counts once. Two blocks per clip (`video.infer_frames 24`), 64*64 frames to keep it cheap."""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

import model.parallel.followers
from model.config import load_config
from model.io_types import AudioWindow, VideoClip
from server.engine import ModelEngine, streams_parts
from server.metrics import ServerMetrics
from server.playout import PlayoutClock
from server.reference_image import drawn_reference
from server.session import Session
from server.tracks import VIDEO_CLOCK_RATE
from tests.server.reliability_support import mic_frames, noise_window

pytestmark = pytest.mark.timeout(300)

FPS = 16.0
BLOCK_FRAMES = 12
CLIP_FRAMES = 24  # two blocks
GATE_TIMEOUT_S = 60.0  # generous: a part that never reaches the loop mid-clip fails the test, not hangs it


def two_block_cfg(**overrides: Any):
    base = {"video.size": "64*64", "video.infer_frames": CLIP_FRAMES, "runtime.num_threads": 1,
            "server.max_sessions": 2}
    base.update(overrides)
    return load_config(None, base)


@pytest.fixture
async def engine():
    engine = ModelEngine(two_block_cfg())
    engine.metrics = ServerMetrics()
    await engine.load()
    yield engine
    await engine.close()


window = noise_window  # window n of quiet noise in the engine's format


class GatedAvatar:
    """The real avatar, but after each non-final part the worker waits until the loop has that part.

    `waits` records, per part, whether the part reached the loop before the worker went on to compute
    the next block: proof that parts leave mid-clip, with no wall-clock assumptions.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._seen: set[tuple[int, int]] = set()
        self._cond = threading.Condition()
        self.waits: list[tuple[int, int, bool]] = []
        self.computed: list[tuple[int, int]] = []  # (clip_index, offset) in the order the worker made them

    def arrived(self, part: VideoClip) -> None:  # on the loop
        with self._cond:
            self._seen.add((part.clip_index, part.offset))
            self._cond.notify_all()

    def clip_parts(self, window: AudioWindow, sample_steps: int | None = None):
        for part in self.inner.clip_parts(window, sample_steps):
            self.computed.append((part.clip_index, part.offset))
            yield part
            if not part.final:
                key = (part.clip_index, part.offset)
                with self._cond:
                    reached = self._cond.wait_for(lambda k=key: k in self._seen, GATE_TIMEOUT_S)
                self.waits.append((*key, reached))

    def next_clip(self, window: AudioWindow, sample_steps: int | None = None) -> VideoClip:
        return self.inner.next_clip(window, sample_steps)

    def start(self, reference_image: np.ndarray, prompt: str) -> None:
        self.inner.start(reference_image, prompt)

    def close(self) -> None:
        self.inner.close()


class ForwardingAvatar:
    """Like model.parallel.followers.GroupAvatar: its own next_clip, everything else forwarded to the inner one."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.next_clip_calls = 0

    def next_clip(self, window: AudioWindow, sample_steps: int | None = None) -> VideoClip:
        self.next_clip_calls += 1
        return self._inner.next_clip(window, sample_steps)

    def __getattr__(self, name: str) -> Any:
        if name == "clip_parts":
            raise AssertionError("the engine must not reach past the wrapper's next_clip")
        return getattr(self._inner, name)


def wrap_new_avatars(monkeypatch, wrapper) -> list[Any]:
    """Every avatar the engine makes from now on is `wrapper(real avatar)`; returns the list of them."""
    made: list[Any] = []
    real_new_avatar = model.parallel.followers.new_avatar

    def new_avatar(*args: Any, **kwargs: Any) -> Any:
        avatar = wrapper(real_new_avatar(*args, **kwargs))
        made.append(avatar)
        return avatar

    monkeypatch.setattr(model.parallel.followers, "new_avatar", new_avatar)
    return made


async def test_parts_arrive_in_order_mid_clip_and_join_to_the_whole_clip(engine, monkeypatch):
    gated = wrap_new_avatars(monkeypatch, GatedAvatar)
    await engine.start("parts", drawn_reference(), "hi")
    monkeypatch.undo()
    await engine.start("whole", drawn_reference(), "hi")  # same seed, plain next_clip
    avatar = gated[0]
    parts: list[VideoClip] = []

    def on_part(part: VideoClip) -> None:
        parts.append(part)
        avatar.arrived(part)

    engine.set_sample_steps("parts", 2)
    finals = []
    for i in range(2):
        finals.append(await engine.submit("parts", window(engine, i), on_part=on_part))
        whole = await engine.submit("whole", window(engine, i))
        mine = [p for p in parts if p.clip_index == i]
        assert [(p.offset, p.final, len(p.frames)) for p in mine] == [(0, False, 12), (12, True, 12)]
        assert [p.t0 for p in mine] == pytest.approx([whole.t0, whole.t0 + BLOCK_FRAMES / FPS])
        assert finals[-1] is mine[-1]  # submit resolves to the final part
        joined = np.concatenate([p.frames for p in mine])
        assert joined.shape == whole.frames.shape == (CLIP_FRAMES, 64, 64, 3)
    assert [(p.clip_index, p.offset) for p in parts] == avatar.computed == [(0, 0), (0, 12), (1, 0), (1, 12)]
    assert avatar.waits == [(0, 0, True), (1, 0, True)], "a first part did not reach the loop mid-clip"
    stats = engine.stats("parts")
    assert (stats.clips_done, stats.last_clip_index, stats.last_clip_sample_steps) == (2, 1, 2)
    assert 0 < stats.last_first_part_s <= stats.last_generation_s
    assert engine.metrics.clips_generated._value.get() == 4  # two clips per session, each counted once


async def test_parts_match_next_clip_at_equal_steps(engine):
    await engine.start("parts", drawn_reference(), "hi")
    await engine.start("whole", drawn_reference(), "hi")
    for i in range(2):
        parts: list[VideoClip] = []
        await engine.submit("parts", window(engine, i), on_part=parts.append)
        whole = await engine.submit("whole", window(engine, i))
        joined = np.concatenate([p.frames for p in parts])
        assert np.abs(joined.astype(int) - whole.frames.astype(int)).max() <= 1


async def test_an_avatar_without_clip_parts_gives_one_whole_part(engine, monkeypatch):
    made = wrap_new_avatars(monkeypatch, ForwardingAvatar)
    await engine.start("a", drawn_reference(), "hi")
    assert not streams_parts(made[0]) and streams_parts(made[0]._inner)
    parts: list[VideoClip] = []
    clip = await engine.submit("a", window(engine, 0), on_part=parts.append)
    assert parts == [clip] and (clip.offset, clip.final, len(clip.frames)) == (0, True, CLIP_FRAMES)
    assert made[0].next_clip_calls == 1


async def test_a_part_the_consumer_refuses_fails_that_clip_only(engine):
    await engine.start("a", drawn_reference(), "hi")
    seen: list[int] = []

    def refuse(part: VideoClip) -> None:
        seen.append(part.offset)
        raise ValueError("no room for this part")

    with pytest.raises(ValueError, match="no room"):
        await engine.submit("a", window(engine, 0), on_part=refuse)
    assert seen == [0]  # the clip's later parts are not handed out after the failure
    parts: list[VideoClip] = []
    await engine.submit("a", window(engine, 1), on_part=parts.append)  # the session goes on
    assert [p.offset for p in parts] == [0, 12]


async def test_a_stopped_session_gets_no_more_parts(engine, monkeypatch):
    gated = wrap_new_avatars(monkeypatch, GatedAvatar)
    await engine.start("a", drawn_reference(), "hi")
    avatar = gated[0]
    parts: list[VideoClip] = []
    first_in = asyncio.Event()

    def on_part(part: VideoClip) -> None:
        parts.append(part)
        first_in.set()

    job = asyncio.create_task(engine.submit("a", window(engine, 0), on_part=on_part))
    await asyncio.wait_for(first_in.wait(), GATE_TIMEOUT_S)  # the worker now waits at the gate
    job.cancel()  # the session goes away mid-clip
    await asyncio.gather(job, return_exceptions=True)
    avatar.arrived(parts[0])  # let the worker finish the clip
    await engine.stop("a")  # returns after the clip in work and the caches are freed
    assert [p.offset for p in parts] == [0] and avatar.computed == [(0, 0), (0, 12)]


class CountingPacer:
    """Ticks at once, one frame index at a time (no wall clock, so no skipped ticks)."""

    index = -1

    async def next_tick(self) -> float:
        self.index += 1
        return float(self.index)


class SteppingClock:
    """Plays stream time `start + n / fps` at the n-th frame asked for, whatever the wall clock says."""

    def __init__(self, start_s: float, fps: float) -> None:
        self.start_s, self.fps, self.n = start_s, fps, 0

    def stream_time_at(self, wall_s: float) -> float:
        t = self.start_s + self.n / self.fps
        self.n += 1
        return t


async def test_a_session_plays_parts_as_one_continuous_stream(monkeypatch):
    """Live path: mic frames -> windows -> parts reach the session mid-clip -> the video track plays them
    back to back, frame by frame, with whole-frame pts steps and no idle frame between parts or clips."""
    cfg = two_block_cfg(**{"server.max_sessions": 1})
    engine = ModelEngine(cfg)
    await engine.load()
    gated = wrap_new_avatars(monkeypatch, GatedAvatar)
    session = Session(cfg, engine, drawn_reference())
    try:
        await session.start(drawn_reference(), "hi")
        avatar = gated[0]
        arrivals: list[tuple[VideoClip, int, float | None]] = []  # part, clips played before it, clock delay
        play_part = session._play_part

        def record(part: VideoClip) -> None:
            play_part(part)
            arrivals.append((part, session.clips_played, session.clock.delay_s))
            avatar.arrived(part)

        monkeypatch.setattr(session, "_play_part", record)
        windows = sum(session.push_audio(frame) for frame in mic_frames(3.05))
        assert windows == 2
        deadline = time.monotonic() + 240
        while session.clips_played < 2:
            assert time.monotonic() < deadline, "two clips did not play"
            await asyncio.sleep(0.05)

        parts = [a[0] for a in arrivals]
        assert [(p.clip_index, p.offset, p.final) for p in parts] == \
            [(0, 0, False), (0, 12, True), (1, 0, False), (1, 12, True)]
        assert avatar.waits == [(0, 0, True), (1, 0, True)], "a first part did not reach the session mid-clip"
        assert [a[1] for a in arrivals] == [0, 1, 1, 2], "a clip counts as played once, on its final part"
        assert arrivals[0][2] is not None, "the first part starts playout (sets the delay)"
        assert session.clock.last_latency_s is not None
        t0s = [p.t0 for p in parts]
        assert np.diff(t0s) == pytest.approx([BLOCK_FRAMES / FPS] * 3), "parts are back to back in stream time"
        assert session.stats()["first_part_ms"] <= session.stats()["generation_ms"]

        # play them: one frame per tick, stream time stepping one frame at a time from the first part
        track = session.video_track
        assert track.queued_clips == 4
        track._clock = SteppingClock(parts[0].t0, FPS)
        track._pacer = CountingPacer()
        sent = [await track.recv() for _ in range(2 * CLIP_FRAMES)]
        expected = np.concatenate([p.frames for p in parts])
        assert track.idle_frames_sent == 0 and track.clip_frames_sent == 2 * CLIP_FRAMES
        assert np.diff([f.pts for f in sent]).tolist() == [round(VIDEO_CLOCK_RATE / FPS)] * (2 * CLIP_FRAMES - 1)
        for i, frame in enumerate(sent):
            assert np.array_equal(frame.to_ndarray(format="rgb24"), expected[i]), f"frame {i} out of order"
    finally:
        await session.close()
        await engine.close()


def test_the_clock_counts_a_clips_parts_as_one_clip():
    """The first part sets the clip's latency; a late later part raises the delay at once; the delay
    falls one step per clip (not per part), so parts do not make it fall faster."""
    clock = PlayoutClock(margin_s=0.1, latency_history=1, max_fall_per_clip_s=0.05)
    clock.note_audio(10.0, arrival_wall_s=110.0)  # stream time 0 arrived at wall 100
    assert clock.note_clip_ready(0.0, 0.75, 100.5, first_part=True) == pytest.approx(0.5)
    assert clock.delay_s == pytest.approx(0.6)
    clock.note_clip_ready(0.75, 1.5, 101.5, first_part=False)  # latency 0.75: late, the delay rises now
    assert clock.delay_s == pytest.approx(0.85) and clock.last_latency_s == pytest.approx(0.5)
    for t0 in (1.5, 2.25):  # the next clip's parts, both early: one fall step for the clip
        clock.note_clip_ready(t0, t0 + 0.75, 100.0 + t0 + 0.2, first_part=t0 == 1.5)
    assert clock.delay_s == pytest.approx(0.80)
    assert clock.last_latency_s == pytest.approx(0.2)
