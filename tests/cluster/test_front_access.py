"""The front before any replica is ready (a real replica object, still loading): health says so, offers are
refused as busy, and the single server's token rules hold at the front."""
from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from cluster.front import FrontServer
from cluster.links import InProcessLink
from cluster.replica import AvatarReplica
from model.config import load_config


@pytest.fixture
async def front_client():
    cfg = load_config(None, {"server.token": "s3cret"})
    front = FrontServer(cfg, [InProcessLink("avatar_0", AvatarReplica(cfg))])  # not started: its model is loading
    await front.start()
    client = TestClient(TestServer(front.build_app()))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await front.close()


async def test_health_is_open_but_replica_details_need_the_token(front_client):
    response = await front_client.get("/healthz")
    report = await response.json()
    assert response.status == 503 and report["status"] == "unavailable" and report["replicas_ready"] == 0
    assert "replica_status" not in report, "hosts and pids are not for anyone who asks"
    response = await front_client.get("/healthz", headers={"Authorization": "Bearer s3cret"})
    details = (await response.json())["replica_status"]["avatar_0"]
    assert details["ready"] is False and details["status"] == "loading" and details["pid"] > 0


async def test_control_endpoints_need_the_token(front_client):
    for path in ("/metrics", "/config.json"):
        assert (await front_client.get(path)).status == 401
    assert (await front_client.post("/offer", json={"sdp": "v=0"})).status == 401
    response = await front_client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert response.status == 200 and 'liveavatar_replica_up{replica="avatar_0"} 0.0' in await response.text()


async def test_an_offer_with_no_replica_ready_is_busy_and_says_why(front_client):
    response = await front_client.post("/offer", json={"sdp": "v=0", "type": "offer"},
                                       headers={"Authorization": "Bearer s3cret"})
    body = await response.json()
    assert response.status == 503 and body["code"] == "busy" and "no avatar replica is ready" in body["message"]
    async with front_client.ws_connect("/ws?token=s3cret") as ws:
        await ws.send_str(json.dumps({"type": "offer", "sdp": "v=0"}))
        message = await ws.receive_json(timeout=10)
        assert message["code"] == "busy" and "0 of 1" in message["message"]
        await ws.send_str("not json")  # nothing to relay it to: the front says so, the socket stays
        message = await ws.receive_json(timeout=10)
        assert message["code"] == "unavailable"
        await ws.send_bytes(b"\x00")
        assert (await ws.receive_json(timeout=10))["code"] == "bad_message"
        assert not ws.closed
