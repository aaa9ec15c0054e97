"""The cluster's front and one replica in one process (no Ray): the code path of `run_server.py cluster
--address none`, and the same front and replica classes Ray Serve runs."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from cluster.front import FrontServer
from cluster.links import InProcessLink
from cluster.replica import AvatarReplica
from model.config import load_config
from tests.cluster.stream_checks import check_frames_and_voice, speech_done
from tests.server.conftest import write_wav
from tests.server.webrtc_client import LoopbackClient, WhepClient, run_client

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def front_url():
    cfg = load_config(None, {"server.max_sessions": 1, "server.stats_interval_s": 0.5})
    replica = AvatarReplica(cfg, relay_secret="s3cret-relay")
    await replica.start()
    front = FrontServer(cfg, [InProcessLink("avatar_0", replica)], "s3cret-relay")
    await front.start()
    runner = web.AppRunner(front.build_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", replica
    finally:
        await runner.cleanup()
        await replica.close()


class _Address:
    def __init__(self, url: str) -> None:
        self.ws_url = url.replace("http://", "ws://") + "/ws"


async def test_front_relays_a_session_and_refuses_the_next_when_full(front_url, speech_pcm):
    url, replica = front_url
    fmt = replica.engine.stream_format
    refused: dict = {}

    async def second_page(client: LoopbackClient) -> None:
        if refused or not client.stats():
            return
        other = LoopbackClient(_Address(url).ws_url, speech_pcm)
        try:
            await other.connect()
        finally:
            await other.close()
        refused["errors"] = other.errors()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/offer", json={"sdp": "v=0", "type": "offer"}) as response:
                refused["http_status"] = response.status
            async with http.get(f"{url}/healthz") as response:
                refused["health"] = await response.json()
            async with http.get(f"{url}/metrics") as response:
                refused["metrics"] = await response.text()

    client = await run_client(_Address(url), speech_pcm[: 3 * 48000], until_s=120, during=second_page,
                              done=speech_done(3))
    assert not client.errors(), client.errors()
    answer = next(m for m in client.messages if m["type"] == "answer")
    assert answer["replica"] == "avatar_0" and "c=IN IP4" in answer["sdp"]
    check_frames_and_voice(client, speech_pcm[: 3 * 48000], fmt.fps, fmt.frames_per_clip)

    # while the one slot was taken: a second page got busy at the front, naming the slots
    assert [e["code"] for e in refused["errors"]] == ["busy"], refused["errors"]
    assert "1 session slots" in refused["errors"][0]["message"]
    assert refused["http_status"] == 503
    assert refused["health"]["replicas_ready"] == 1 and refused["health"]["sessions"] == 1
    assert 'liveavatar_replica_up{replica="avatar_0"} 1.0' in refused["metrics"]
    assert 'liveavatar_sessions{replica="avatar_0"} 1.0' in refused["metrics"]
    assert 'liveavatar_front_errors_total{kind="busy"} 2.0' in refused["metrics"]


async def test_the_sessions_api_through_the_front_reaches_the_replica_holding_the_session(front_url, speech_pcm,
                                                                                          tmp_path):
    url, replica = front_url
    speech = speech_pcm[: 3 * 48000]
    write_wav(tmp_path / "speech.wav", speech, 48000)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/sessions", json={}) as response:
            created = await response.json()
            assert response.status == 201 and created["kind"] == "api", created
        async with http.post(f"{url}/sessions", json={}) as response:  # the one slot is taken
            assert response.status == 503 and (await response.json())["code"] == "busy"
        viewer = WhepClient(url + created["whep"])  # WHEP through the front; media straight to the replica
        await viewer.connect()
        try:
            async with http.post(f"{url}/sessions/{created['id']}/speak", data=(tmp_path / "speech.wav").read_bytes(),
                                 headers={"Content-Type": "audio/wav"}) as response:
                queued = await response.json()
                assert response.status == 202 and abs(queued["duration_s"] - 3.0) < 0.01, queued

            async def described() -> dict:
                async with http.get(f"{url}/sessions/{created['id']}") as response:
                    assert response.status == 200
                    return await response.json()

            # the speech's 4 clips were made and played on the replica, and the viewer got the video
            deadline = time.monotonic() + 120
            while (await described())["clips"] < 4 and time.monotonic() < deadline:
                await asyncio.sleep(1.0)
            assert (await described())["clips"] >= 4, await described()
            assert len(viewer.video) > 16, f"only {len(viewer.video)} frames reached the WHEP viewer"
            async with http.get(f"{url}/sessions") as response:
                listed = (await response.json())["sessions"]
            assert [(s["id"], s["replica"], s["viewers"]) for s in listed] == [(created["id"], "avatar_0", 1)]
        finally:
            await viewer.close()
        async with http.delete(f"{url}/sessions/{created['id']}") as response:
            assert response.status == 200
        async with http.get(f"{url}/sessions/{created['id']}") as response:
            assert response.status == 404 and (await response.json())["code"] == "unknown_session"
        async with http.get(f"{url}/sessions/nosuchsession") as response:
            assert response.status == 404
    assert replica.engine.active_sessions == 0, "the deleted session still holds its slot"
