"""End to end over loopback: an aiortc client talks to the live server through /ws with real WebRTC."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from model.io_types import VideoClip
from server.reference_image import drawn_reference, resize_rgb
from server.tracks import AvatarVideoTrack
from tests.server.av_analysis import (
    align_chunks,
    align_pieces,
    audio_timeline,
    first_clip_frame,
    idle_distance,
    is_clip_frame,
    nearest_made_frame,
)
from tests.server.conftest import start_server
from tests.server.webrtc_client import LoopbackClient, run_client

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def queued_parts(monkeypatch: pytest.MonkeyPatch) -> list[VideoClip]:
    """Every clip part the server queues for playout: the frames the model made, with their clip and stream time.

    The test needs them to tell clip frames from idle ones: the trained avatar paints the reference so
    closely that no fixed likeness threshold to the reference separates the two.
    """
    parts: list[VideoClip] = []
    add_clip = AvatarVideoTrack.add_clip

    def recording_add_clip(track: AvatarVideoTrack, clip: VideoClip) -> None:
        add_clip(track, clip)
        parts.append(clip)

    monkeypatch.setattr(AvatarVideoTrack, "add_clip", recording_add_clip)
    return parts


async def test_avatar_video_and_returned_voice_arrive_in_sync(tiny_engine, tiny_cfg, speech_pcm, queued_parts):
    server, runner = await start_server(tiny_cfg, tiny_engine)
    try:
        client = await run_client(server, speech_pcm, until_s=40)
    finally:
        await runner.cleanup()
    fmt = tiny_engine.stream_format
    assert not client.errors(), client.errors()

    # video: size, clock (the received rate depends on the machine's load: bench/latency_cpu.py measures it)
    video = client.video
    assert len(video) > 3 * fmt.fps
    assert {v.rgb.shape for v in video} == {(*fmt.frame_size, 3)}
    pts = np.array([v.pts for v in video])
    assert np.all(np.diff(pts) > 0), "video pts must increase"
    assert np.all(np.diff(pts) % round(90000 / fmt.fps) == 0), "pts steps must be whole frames of 90 kHz"

    # frames made from the speech arrive, and differ from the idle (reference) frames
    reference = resize_rgb(drawn_reference(), *fmt.frame_size)
    assert queued_parts, "the server queued no clip for playout"
    made = np.concatenate([p.frames for p in queued_parts])
    assert not is_clip_frame(video[0].rgb, reference, made), "before the first clip the avatar shows idle frames"
    clip_frames = [v for v in video if is_clip_frame(v.rgb, reference, made)]
    assert len(clip_frames) >= fmt.frames_per_clip, f"only {len(clip_frames)} clip frames arrived"

    # the returned audio is the user's own voice, most voiced half seconds of it whole; one with a
    # playout pause inside it (generation slower than real time) comes back in pieces, each unchanged
    pcm, arrival = audio_timeline(client.audio)
    pieces = align_pieces(speech_pcm, pcm)
    found = [p for p in pieces if p.peak > 0.8]
    voiced_s = sum(p.samples for p in pieces) / 48000
    found_s = sum(p.samples for p in found) / 48000
    summary = [(p.start_samples / 48000, round(p.peak, 2)) for p in pieces]
    assert voiced_s >= 2.0, f"only {voiced_s:.2f} s of voiced speech in the test speech"
    # (0.75: on a loaded machine late clips pause playout more often, and a piece below 0.125 s is not split again)
    assert found_s >= 0.75 * voiced_s, f"only {found_s:.2f} of {voiced_s:.2f} s came back: {summary}"
    assert all(b.lag_samples > a.lag_samples for a, b in itertools.pairwise(found)), "voice came back out of order"

    # ... and it lands with the video made from it: stream time 0 (the first sample sent) is clip 0's first frame.
    # Measured within clip 0 only: when generation is slower than real time the voice pauses (with the video)
    # at the end of each late clip or part, so a chunk reaching past clip 0 could land after such a pause.
    clip0_parts = [p for p in queued_parts if p.clip_index == 0]
    assert clip0_parts and clip0_parts[0].t0 == 0 and clip0_parts[0].offset == 0, "clip 0 was not played"
    clip0_made = np.concatenate([p.frames for p in clip0_parts])
    first = first_clip_frame(video, reference, clip0_made)
    assert first is not None, "no frame of clip 0 arrived"
    assert first is first_clip_frame(video, reference, made), "a frame of a later clip arrived before clip 0"
    codec_error = nearest_made_frame(first.rgb, clip0_made)[1]
    assert idle_distance(first.rgb, reference) > 2 * codec_error, \
        "clip 0's first frame cannot be told apart from an idle frame"
    clip0 = round(fmt.frames_per_clip / fmt.fps * 48000)
    opening = next((c for c in align_chunks(speech_pcm[:clip0], pcm, 0.125) if c.peak > 0.8), None)
    assert opening is not None, "the speech must begin in clip 0"
    sample0_arrival_s = arrival[opening.lag_samples] - opening.start_samples / 48000
    offset_s = first.arrival_s - sample0_arrival_s
    assert abs(offset_s) <= 1 / fmt.fps, f"A/V offset {offset_s * 1000:.0f} ms is more than one frame"


async def test_set_sample_steps_mid_stream_changes_the_next_clip(tiny_engine, tiny_cfg, speech_pcm):
    server, runner = await start_server(tiny_cfg, tiny_engine)
    sent: dict = {}

    async def tune(client: LoopbackClient) -> None:
        stats = client.stats()
        if "at" not in sent and stats and stats[-1]["clip_index"] is not None:
            await client.send({"type": "set", "sample_steps": 0})  # refused, the session goes on
            await client.send({"type": "set", "sample_steps": 2})
            sent["at"] = time.monotonic()
            sent["done_index"] = stats[-1]["clip_index"]

    def clips_after_set(client: LoopbackClient) -> list[tuple[int, int]]:
        seen: dict[int, int] = {}
        for s in client.stats():
            if "at" in sent and s["clip_index"] is not None and s["clip_index"] > sent["done_index"]:
                seen.setdefault(s["clip_index"], s["clip_sample_steps"])
        return sorted(seen.items())

    try:
        client = await run_client(server, speech_pcm, until_s=60, during=tune,
                                  done=lambda c, _: len(clips_after_set(c)) >= 2)
    finally:
        await runner.cleanup()
    assert [e["code"] for e in client.errors()] == ["bad_sample_steps"], client.errors()
    assert "1..8" in client.errors()[0]["message"]
    after = [s for s in client.stats() if s["received_s"] > sent["at"] + 0.5]
    assert after and all(s["sample_steps"] == 2 for s in after)
    # the clip already in work when the message came may finish with 4 steps; every later one uses 2
    clips = clips_after_set(client)
    assert len(clips) >= 2, clips
    assert all(steps == 2 for _, steps in clips[1:]), clips
