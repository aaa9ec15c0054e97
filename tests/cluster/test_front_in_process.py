"""The cluster's front and one replica in one process (no Ray): the code path of `run_server.py cluster
--address none`, and the same front and replica classes Ray Serve runs."""
from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from cluster.front import FrontServer
from cluster.links import InProcessLink
from cluster.replica import AvatarReplica
from model.config import load_config
from tests.cluster.stream_checks import check_frames_and_voice, speech_done
from tests.server.webrtc_client import LoopbackClient, run_client

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def front_url():
    cfg = load_config(None, {"server.max_sessions": 1, "server.stats_interval_s": 0.5})
    replica = AvatarReplica(cfg)
    await replica.start()
    front = FrontServer(cfg, [InProcessLink("avatar_0", replica)])
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
