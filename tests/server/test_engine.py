"""ModelEngine on the real tiny model: admission, cancellation, back-pressure, an unblocked event loop."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from model.config import load_config
from server.engine import ModelEngine
from server.reference_image import drawn_reference
from server.seam import ClipDropped, EngineBusy, SessionClosed
from tests.server.reliability_support import noise_window

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def engine():
    # 64x64 frames keep each clip cheap; the scheduling under test does not depend on size
    cfg = load_config(None, {"video.size": "64*64", "server.max_sessions": 1, "server.max_pending_clips": 1})
    engine = ModelEngine(cfg)
    await engine.load()
    yield engine
    await engine.close()


window = noise_window  # window n of quiet noise in the engine's format


async def test_a_session_beyond_the_limit_is_refused_at_once(engine):
    await engine.start("a", drawn_reference(), "hi")
    refusal = engine.start("b", drawn_reference(), "hi")
    with pytest.raises(EngineBusy, match="1 session slots are in use"):
        refusal.send(None)  # refused on its first step: it never waits on the model or anything else
    await engine.stop("a")
    await engine.start("b", drawn_reference(), "hi")  # the freed slot is usable again
    assert engine.active_sessions == 1


async def test_clips_come_back_in_order_with_the_stream_format(engine):
    await engine.start("a", drawn_reference(), "hi")
    clip = await engine.submit("a", window(engine, 0))
    fmt = engine.stream_format
    assert clip.frames.shape == (fmt.frames_per_clip, *fmt.frame_size, 3) and clip.frames.dtype == np.uint8
    assert (clip.clip_index, clip.t0) == (0, 0.0)
    engine.set_sample_steps("a", 2)
    await engine.submit("a", window(engine, 1))
    stats = engine.stats("a")
    assert (stats.clips_done, stats.last_clip_index, stats.last_clip_sample_steps) == (2, 1, 2)
    with pytest.raises(ValueError, match="1..8"):
        engine.set_sample_steps("a", 100)


async def test_a_slow_session_drops_its_oldest_waiting_window(engine):
    await engine.start("a", drawn_reference(), "hi")
    jobs = [asyncio.create_task(engine.submit("a", window(engine, 0)))]
    await asyncio.sleep(0.05)  # clip 0 is now in work
    jobs += [asyncio.create_task(engine.submit("a", window(engine, i))) for i in range(1, 4)]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    kinds = [type(r).__name__ for r in results]
    # with one place in the queue, each newer window pushes the one waiting before it out
    assert kinds == ["VideoClip", "ClipDropped", "ClipDropped", "VideoClip"], kinds
    assert engine.stats("a").clips_dropped == 2
    assert isinstance(results[1], ClipDropped) and "slower than real time" in str(results[1])


async def test_stopping_a_session_cancels_its_queued_work(engine):
    await engine.start("a", drawn_reference(), "hi")
    in_work = asyncio.create_task(engine.submit("a", window(engine, 0)))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(engine.submit("a", window(engine, 1)))
    await asyncio.sleep(0.05)
    assert engine.stats("a").queue_depth == 2
    await engine.stop("a")  # returns once the clip in work is done and the caches are freed
    assert waiting.cancelled()
    assert (await in_work).clip_index == 0  # the clip in work finishes; nothing after it runs
    with pytest.raises(SessionClosed):
        await engine.submit("a", window(engine, 2))
    assert engine.active_sessions == 0


async def test_model_work_does_not_block_the_event_loop(engine):
    await engine.start("a", drawn_reference(), "hi")
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    threads: list[int] = []
    avatar_cls = type(engine._slots["a"].avatar)
    original = avatar_cls.next_clip

    def next_clip(avatar, *args, **kwargs):
        threads.append(threading.get_ident())
        return original(avatar, *args, **kwargs)

    avatar_cls.next_clip = next_clip
    try:
        await engine.submit("a", window(engine, 0))
    finally:
        avatar_cls.next_clip = original
        tick.cancel()
    # the clip ran on the model's worker thread and the loop kept ticking meanwhile (how evenly depends on
    # the machine's load, so no gap length is asserted)
    assert threads and threads[0] != threading.get_ident()
    assert len(gaps) >= 3, gaps


async def test_start_up_warm_up_runs_before_serving_and_leaves_sessions_unchanged(caplog):
    # runtime.warmup_clips: silent clips at load (compiled shapes, kernel choice), then fresh sessions
    frames = {}
    for clips in (0, 2):
        cfg = load_config(None, {"video.size": "64*64", "runtime.warmup_clips": clips})
        engine = ModelEngine(cfg)
        with caplog.at_level("INFO", logger="server.engine"):
            await engine.load()
        try:
            await engine.start("a", drawn_reference(), "hi")
            frames[clips] = [(await engine.submit("a", window(engine, k))).frames for k in range(2)]
        finally:
            await engine.close()
    assert "warm-up: 2 silent clips" in caplog.text
    assert caplog.text.count("warm-up:") == 1  # none without warmup_clips
    for cold, warm in zip(frames[0], frames[2]):
        assert np.array_equal(cold, warm)
