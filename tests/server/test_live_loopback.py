"""End to end over loopback: an aiortc client talks to the live server through /ws with real WebRTC."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from server.reference_image import drawn_reference, resize_rgb
from tests.server.av_analysis import align, audio_timeline, first_clip_frame, looks_like
from tests.server.conftest import start_server
from tests.server.seam_generator import LoudnessGenerator
from tests.server.webrtc_client import LoopbackClient

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def engine():
    return LoudnessGenerator()


async def run_client(server, speech_pcm: np.ndarray, until_s: float, during=None) -> LoopbackClient:
    """Stream the speech, then keep receiving until its last clip has had time to play."""
    client = LoopbackClient(server.ws_url, speech_pcm)
    try:
        await client.connect()
        assert not client.errors(), client.errors()
        started = time.monotonic()
        speech_s = len(speech_pcm) / 48000
        while True:
            await asyncio.sleep(0.25)
            if during is not None:
                await during(client, time.monotonic() - started)
            stats = client.stats()
            latency_s = (stats[-1]["latency_ms"] or 0) / 1000 if stats else 0
            elapsed = time.monotonic() - started
            if elapsed > speech_s + latency_s + 1.0 or elapsed > until_s:
                break
    finally:
        await client.close()
    return client


async def test_avatar_video_and_returned_voice_arrive_in_sync(engine, tiny_cfg, speech_pcm):
    server, runner = await start_server(tiny_cfg, engine)
    try:
        client = await run_client(server, speech_pcm, until_s=40)
    finally:
        await runner.cleanup()
    fmt = engine.stream_format
    assert not client.errors(), client.errors()

    # video: size, clock, rate
    video = client.video
    assert len(video) > 3 * fmt.fps
    assert {v.rgb.shape for v in video} == {(*fmt.frame_size, 3)}
    pts = np.array([v.pts for v in video])
    assert np.all(np.diff(pts) > 0), "video pts must increase"
    assert np.all(np.diff(pts) % round(90000 / fmt.fps) == 0), "pts steps must be whole frames of 90 kHz"
    steady = video[len(video) // 4:]
    fps = (len(steady) - 1) / (steady[-1].arrival_s - steady[0].arrival_s)
    assert abs(fps - fmt.fps) <= 0.1 * fmt.fps, f"received {fps:.2f} fps, expected {fmt.fps}"

    # frames made from the speech arrive, and differ from the idle (reference) frames
    reference = resize_rgb(drawn_reference(), *fmt.frame_size)
    assert looks_like(video[0].rgb, reference), "before the first clip the avatar shows idle frames"
    clip_frames = [v for v in video if not looks_like(v.rgb, reference)]
    assert len(clip_frames) >= 2 * fmt.frames_per_clip, f"only {len(clip_frames)} clip frames arrived"

    # the returned audio is the user's own voice
    pcm, arrival = audio_timeline(client.audio)
    alignment = align(speech_pcm, pcm)
    assert alignment.peak > 0.6, f"returned audio does not match the speech (peak {alignment.peak:.2f})"

    # ... and it lands with the video made from it: stream time 0 is clip 0's first frame
    first = first_clip_frame(video, reference)
    offset_s = first.arrival_s - arrival[alignment.lag_samples]
    assert abs(offset_s) <= 1 / fmt.fps, f"A/V offset {offset_s * 1000:.0f} ms is more than one frame"
