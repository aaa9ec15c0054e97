"""Per-client caps: open websockets, offers in progress, sockets that never offer; each refusal names its flag."""
from __future__ import annotations

import asyncio

import pytest
import websockets

from server.client_caps import ClientCaps, close_when_idle
from tests.server.reliability_support import JsonSocket, offer_sdp, running_server, server_state, small_cfg

pytestmark = pytest.mark.timeout(120)


async def test_websockets_beyond_the_per_client_cap_are_refused_and_a_closed_one_frees_its_place():
    cfg = small_cfg(**{"server.max_connections_per_client": 3})
    async with running_server(cfg) as (server, _):
        sockets = [await JsonSocket.connect(server.ws_url) for _ in range(3)]
        try:
            with pytest.raises(websockets.InvalidStatus) as refused:
                await JsonSocket.connect(server.ws_url)
            assert refused.value.response.status_code == 429
            assert b"max_connections_per_client" in refused.value.response.body
            assert (await sockets[0].request("{oops"))["code"] == "bad_json"  # the open ones still work
            await sockets.pop(0).close()
            for _ in range(50):
                if server_state(server).caps.held("websocket", "127.0.0.1") < 3:
                    break
                await asyncio.sleep(0.05)
            sockets.append(await JsonSocket.connect(server.ws_url))
        finally:
            for ws in sockets:
                await ws.close()
        for _ in range(50):
            if server_state(server).caps.held("websocket", "127.0.0.1") == 0:
                break
            await asyncio.sleep(0.05)
        assert server_state(server).caps.held("websocket", "127.0.0.1") == 0


async def test_a_websocket_that_sends_no_offer_is_told_and_closed():
    cfg = small_cfg(**{"server.offer_timeout_s": 1.0})
    async with running_server(cfg) as (server, _):
        ws = await JsonSocket.connect(server.ws_url)
        try:
            reply = await ws.receive(timeout_s=10)
            assert reply["code"] == "offer_timeout" and "--server.offer_timeout_s" in reply["message"], reply
            with pytest.raises(websockets.ConnectionClosed):
                await ws.receive(timeout_s=10)
        finally:
            await ws.close()


async def test_offers_waiting_beyond_the_per_client_cap_are_refused():
    cfg = small_cfg(**{"server.max_sessions": 1, "server.max_queued": 4, "server.max_pending_offers_per_client": 1})
    async with running_server(cfg) as (server, engine):
        pcs, sockets = [], []
        try:
            for _ in range(3):
                pc, sdp = await offer_sdp()
                pcs.append(pc)
                sockets.append((await JsonSocket.connect(server.ws_url), sdp))
            (first, sdp1), (second, sdp2), (third, sdp3) = sockets
            assert (await first.request({"type": "offer", "sdp": sdp1}))["type"] == "answer"
            assert (await second.request({"type": "offer", "sdp": sdp2}))["type"] == "queued"  # one pending
            refused = await third.request({"type": "offer", "sdp": sdp3})
            assert refused["code"] == "too_many_connections", refused
            assert "--server.max_pending_offers_per_client" in refused["message"]
            assert engine.active_sessions == 1
        finally:
            for ws, _ in sockets:
                await ws.close()
            for pc in pcs:
                await pc.close()


def test_caps_count_per_address_and_forget_released_ones():
    caps = ClientCaps(small_cfg(**{"server.max_viewers_per_client": 2}))
    with caps.hold("viewer", "a"), caps.hold("viewer", "a"):
        caps.acquire("viewer", "b")  # another address has its own count
        with pytest.raises(RuntimeError, match="max_viewers_per_client"):
            caps.acquire("viewer", "a")
    caps.release("viewer", "b")
    assert caps.held("viewer", "a") == 0 and not caps._held


async def test_close_when_idle_waits_for_an_unbroken_idle_stretch():
    idle = {"now": True}
    closed = asyncio.Event()
    watcher = asyncio.create_task(close_when_idle(lambda: idle["now"], closed.set, 0.3, poll_s=0.05))
    await asyncio.sleep(0.15)
    idle["now"] = False  # busy: the stretch starts again
    await asyncio.sleep(0.3)
    assert not closed.is_set()
    idle["now"] = True
    await asyncio.wait_for(watcher, 5)
    assert closed.is_set()


async def test_whep_viewers_beyond_the_per_client_cap_are_refused():
    import aiohttp

    from tests.server.webrtc_client import WhepClient

    cfg = small_cfg(**{"server.max_viewers_per_client": 1})
    async with running_server(cfg) as (server, _), aiohttp.ClientSession() as http:
        async with http.post(server.url + "/sessions", json={}) as response:
            created = await response.json()
        viewer = WhepClient(server.url + created["whep"])
        await viewer.connect()
        pc, _sdp = await offer_sdp(audio=False)
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        try:
            async with http.post(server.url + created["whep"], data=pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as response:
                refused = await response.json()
                assert response.status == 429 and "--server.max_viewers_per_client" in refused["message"], refused
            async with http.delete(server.url + viewer.location) as response:
                assert response.status == 200  # leaving frees the place
            assert server_state(server).caps.held("viewer", "127.0.0.1") == 0
            await viewer.close()
            viewer = WhepClient(server.url + created["whep"])
            await viewer.connect()
            session = next(iter(server_state(server).sessions))
            assert len(session.viewers) == 1
            async with http.delete(server.url + f"/sessions/{created['id']}") as response:
                assert response.status == 200  # the session's end ends its viewers and frees their places
            assert not session.viewers and server_state(server).caps.held("viewer", "127.0.0.1") == 0
        finally:
            await pc.close()
            await viewer.close()


async def test_the_server_rtmp_url_goes_to_the_first_session_only():
    import aiohttp

    cfg = small_cfg(**{"rtmp": "rtmp://127.0.0.1:9/live/key", "server.max_sessions": 2})  # nothing listens there
    async with running_server(cfg) as (server, _), aiohttp.ClientSession() as http:
        ids = []
        for _ in range(2):
            async with http.post(server.url + "/sessions", json={}) as response:
                ids.append((await response.json())["id"])
        async with http.get(server.url + "/sessions") as response:
            listed = {s["id"]: s["rtmp"] for s in (await response.json())["sessions"]}
        assert listed[ids[0]]["url"] == "rtmp://127.0.0.1:9/live/…" and listed[ids[1]] is None, listed
