"""Clients that vanish mid-clip have their queued work cancelled and everything they held released;
after many connect/stream/disconnect cycles the process is back to its baseline (memory, threads, fds).

Two tests: 100 cycles of the signaling + engine + session path (real `/ws` offer/answer with a real
aiortc offer, a real session and RTCPeerConnection on the server, the real tiny model on a short audio
burst pushed into the session's live path; no ICE/DTLS, so each cycle stays cheap), and a smaller number
of full WebRTC cycles (ICE, DTLS, SRTP, media both ways) for each way a client can vanish. The full
200-WebRTC-cycle run is `bench/webrtc_cycles.py`; its result is in BENCHMARKS.md.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from tests.server.reliability_support import (
    JsonSocket,
    ProcessCounts,
    mic_frames,
    offer_sdp,
    running_server,
    server_state,
    session_by_id,
    settle_and_count,
    small_cfg,
)
from tests.server.webrtc_client import LoopbackClient, SpeechTrack

pytestmark = pytest.mark.timeout(600)

# a 4-frame clip (0.25 s of audio) keeps each cycle's model work short on 2 cores
SHORT_CLIP = {"video.infer_frames": 4, "model.dit.num_frames_per_block": 1}
SIGNALING_CYCLES = 100
RSS_GROWTH_LIMIT_MB = 40.0  # RSS after a heap trim wobbles by ~20 MB; a leak of 0.4 MB a cycle fails


async def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def signaling_cycle(server, engine, index: int) -> dict:
    """Connect, offer, stream a burst (two clip windows), vanish while the first clip is in work."""
    pc, sdp = await offer_sdp()
    ws = await JsonSocket.connect(server.ws_url)
    try:
        answer = await ws.request({"type": "offer", "sdp": sdp})
        assert answer["type"] == "answer", answer
        session = session_by_id(server, answer["session_id"])
        windows = sum(session.push_audio(frame) for frame in mic_frames(0.55, seed=index))
        assert windows == 2
        await wait_until(lambda: engine.queue_depth >= 1, 10, "the burst to reach the engine")
        way = index % 3
        if way == 0:
            ws.ws.transport.abort()  # the network vanished: no close frame
        elif way == 1:
            await ws.close()  # the tab closed
        else:
            assert (await ws.request({"type": "stop"}))["type"] == "stopped"
            await ws.close()
    finally:
        await pc.close()
    state = server_state(server)
    await wait_until(lambda: not state.sessions and engine.active_sessions == 0, 20, "the session to be released")
    await wait_until(lambda: engine.queue_depth == 0, 20, "the engine queue to drain")
    return {"clips_played": session.clips_played, "closed": session.closed.is_set()}


async def test_100_signaling_engine_session_cycles_leave_no_leak():
    cfg = small_cfg(**SHORT_CLIP, **{"server.max_messages_per_s": 1000})
    async with running_server(cfg) as (server, engine):
        for i in range(10):  # warm-up: allocator pools, codec tables, lazily started threads
            await signaling_cycle(server, engine, i)
        before = await settle_and_count()
        clips_before = server_state(server).metrics.clips_generated._value.get()
        started = time.monotonic()
        for i in range(SIGNALING_CYCLES):
            result = await signaling_cycle(server, engine, i)
            assert result["closed"]
        elapsed_s = time.monotonic() - started
        after = await settle_and_count()
        clips = server_state(server).metrics.clips_generated._value.get() - clips_before
    print(f"\n{SIGNALING_CYCLES} cycles in {elapsed_s:.0f} s, {clips:.0f} clips made; before: {before}; "
          f"after: {after}")
    # each cycle's first window was in work when the client vanished (finished, not played); the
    # second was still queued and was cancelled, never run
    assert SIGNALING_CYCLES <= clips < 1.5 * SIGNALING_CYCLES
    assert_back_to_baseline(before, after)


def assert_back_to_baseline(before: ProcessCounts, after: ProcessCounts) -> None:
    assert after.threads <= before.threads, f"threads grew: {before} -> {after}"
    assert after.fds <= before.fds + 2, f"file descriptors grew: {before} -> {after}"
    assert after.tasks <= before.tasks, f"asyncio tasks left behind: {before} -> {after}"
    assert after.rss_mb - before.rss_mb < RSS_GROWTH_LIMIT_MB, f"memory grew: {before} -> {after}"


async def webrtc_cycle(server, engine, speech_pcm, way: str) -> list[dict]:
    """One real WebRTC client that streams speech until a clip is in work, then vanishes `way`."""
    client = LoopbackClient(server.ws_url, speech_pcm)
    state = server_state(server)
    try:
        if way == "ice_failure":
            # the answer never reaches the browser's pc: ICE cannot complete, the server times out
            client.pc.addTrack(SpeechTrack(speech_pcm))
            client.pc.addTransceiver("video", direction="recvonly")
            await client.pc.setLocalDescription(await client.pc.createOffer())
            ws = await JsonSocket.connect(server.ws_url)
            assert (await ws.request({"type": "offer", "sdp": client.pc.localDescription.sdp}))["type"] == "answer"
            await client.pc.close()
            error = await ws.receive(timeout_s=30)
            await ws.close()
            return [error]
        await client.connect()
        await wait_until(lambda: engine.queue_depth >= 1, 30, "a clip in work")
        if way == "websocket_dropped":
            client.ws.transport.abort()
            await client.pc.close()
        elif way == "pc_closed":
            await client.pc.close()  # media gone, the websocket stays open
            await wait_until(lambda: not state.sessions, 60, "the server to notice the closed peer connection")
            await wait_until(lambda: client.errors(), 5, "the page to hear that its session ended")
    finally:
        await client.close()
    await wait_until(lambda: not state.sessions and engine.active_sessions == 0, 60, "the session to be released")
    return client.errors()


async def test_clients_vanishing_mid_clip_over_webrtc_release_everything(speech_pcm):
    cfg = small_cfg(**SHORT_CLIP, **{"server.connect_timeout_s": 3.0})
    async with running_server(cfg) as (server, engine):
        for way in ("websocket_dropped", "pc_closed", "ice_failure"):  # warm-up: each path once
            await webrtc_cycle(server, engine, speech_pcm, way)
        before = await settle_and_count(1.0)
        for way in ("websocket_dropped", "pc_closed", "ice_failure") * 2:
            errors = await webrtc_cycle(server, engine, speech_pcm, way)
            if way == "ice_failure":
                assert [e["code"] for e in errors] == ["connect_timeout"], errors
                assert "did not come up within 3 s" in errors[0]["message"]
            if way == "pc_closed":
                assert "connection_lost" in [e["code"] for e in errors], errors
            assert engine.queue_depth == 0
        after = await settle_and_count(1.0)
    print(f"\n6 WebRTC cycles; before: {before}; after: {after}")
    assert_back_to_baseline(before, after)
