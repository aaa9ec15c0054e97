"""Load: the session limit gives a clear `busy`, and 8 concurrent tiny-model sessions all keep receiving frames."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest

from tests.server.reliability_support import JsonSocket, offer_sdp, running_server, server_state, small_cfg
from tests.server.webrtc_client import LoopbackClient

pytestmark = pytest.mark.timeout(300)


async def test_sessions_beyond_the_limit_get_a_clear_busy_and_a_freed_slot_is_reused():
    cfg = small_cfg(**{"server.max_sessions": 2})
    async with running_server(cfg) as (server, engine):
        sockets, pcs = [], []
        try:
            for _ in range(2):
                pc, sdp = await offer_sdp()
                pcs.append(pc)
                ws = await JsonSocket.connect(server.ws_url)
                sockets.append(ws)
                assert (await ws.request({"type": "offer", "sdp": sdp}))["type"] == "answer"
            pc, sdp = await offer_sdp()
            pcs.append(pc)
            third = await JsonSocket.connect(server.ws_url)
            sockets.append(third)
            busy = await third.request({"type": "offer", "sdp": sdp})
            assert busy["code"] == "busy", busy
            assert "all 2 session slots are in use" in busy["message"]
            async with aiohttp.ClientSession() as http:
                async with http.post(server.url + "/offer", json={"type": "offer", "sdp": sdp}) as response:
                    assert response.status == 503
                    assert (await response.json())["code"] == "busy"
                async with http.get(server.url + "/healthz") as response:
                    health = await response.json()
            assert health["sessions"] == 2 and health["max_sessions"] == 2
            assert engine.active_sessions == 2

            await sockets[0].close()  # someone leaves; the refused page tries again and gets in
            for _ in range(100):
                if engine.active_sessions < 2:
                    break
                await asyncio.sleep(0.05)
            assert (await third.request({"type": "offer", "sdp": sdp}))["type"] == "answer"
        finally:
            for ws in sockets:
                await ws.close()
            for pc in pcs:
                await pc.close()


async def test_eight_concurrent_sessions_each_keep_receiving_frames_and_clips():
    """8 real WebRTC clients on the tiny model at 64*64 with 4-frame clips; sessions take turns on the model,
    so each gets clips (round robin), and every video stream keeps flowing meanwhile. How fast they flow
    depends on the machine's load: `bench/concurrent_sessions.py` measures that."""
    cfg = small_cfg(**{"server.max_sessions": 8, "video.infer_frames": 4, "model.dit.num_frames_per_block": 1})
    rng = np.random.default_rng(0)
    async with running_server(cfg) as (server, _):
        clients = [LoopbackClient(server.ws_url, (rng.standard_normal(48000 * 60) * 3000).astype(np.int16))
                   for _ in range(8)]

        def clips_played(client: LoopbackClient) -> int:
            return (client.stats()[-1]["clips_played"] or 0) if client.stats() else 0

        async def wait_for(ready, what: str) -> None:
            deadline = time.monotonic() + 120
            while not ready():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.5)

        try:
            await asyncio.gather(*(c.connect() for c in clients))
            assert all(not c.errors() for c in clients), [c.errors() for c in clients]
            assert len(server_state(server).sessions) == 8
            await wait_for(lambda: all(clips_played(c) >= 2 for c in clients), "2 clips played in every session")
            frames_before = [len(c.video) for c in clients]
            clips_before = [clips_played(c) for c in clients]
            # every stream goes on: more frames and more clips arrive in each of them
            await wait_for(lambda: all(len(c.video) > n + 2 * cfg.video.infer_frames
                                       for c, n in zip(clients, frames_before)), "more frames in every session")
            await wait_for(lambda: all(clips_played(c) > n for c, n in zip(clients, clips_before)),
                           "another clip in every session")
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    print(f"\n8 sessions: clips played {[clips_played(c) for c in clients]}, frames {[len(c.video) for c in clients]}")
    assert all(not c.errors() for c in clients), [c.errors() for c in clients]


async def test_with_a_waiting_line_offers_are_told_their_place_and_start_in_order():
    cfg = small_cfg(**{"server.max_sessions": 1, "server.max_queued": 2})
    async with running_server(cfg) as (server, engine):
        pcs, sockets = [], []

        async def page() -> tuple[JsonSocket, str]:
            pc, sdp = await offer_sdp()
            pcs.append(pc)
            ws = await JsonSocket.connect(server.ws_url)
            sockets.append(ws)
            return ws, sdp

        try:
            first, sdp = await page()
            assert (await first.request({"type": "offer", "sdp": sdp}))["type"] == "answer"
            second, sdp2 = await page()
            queued = await second.request({"type": "offer", "sdp": sdp2})
            assert queued["type"] == "queued" and queued["position"] == 1, queued
            assert "number 1 in line" in queued["message"]
            third, sdp3 = await page()
            assert (await third.request({"type": "offer", "sdp": sdp3}))["position"] == 2
            fourth, sdp4 = await page()
            full = await fourth.request({"type": "offer", "sdp": sdp4})
            assert full["code"] == "busy" and "waiting line is full (2)" in full["message"], full

            await first.close()  # the head of the line gets the slot, the next moves up
            assert (await second.receive(timeout_s=20))["type"] == "answer"
            moved = await third.receive(timeout_s=20)
            assert moved["type"] == "queued" and moved["position"] == 1, moved

            fifth, sdp5 = await page()  # someone in line leaves: the line shrinks at once
            assert (await fifth.request({"type": "offer", "sdp": sdp5}))["position"] == 2
            third.ws.transport.abort()
            await second.close()
            reply = await fifth.receive(timeout_s=20)
            if reply["type"] == "queued":  # moved up to first in line, then admitted
                assert reply["position"] == 1, reply
                reply = await fifth.receive(timeout_s=20)
            assert reply["type"] == "answer", reply
            assert server_state(server).admission.waiting == 0
            assert len(server_state(server).sessions) == 1 and engine.active_sessions == 1
        finally:
            for ws in sockets:
                await ws.close()
            for pc in pcs:
                await pc.close()
