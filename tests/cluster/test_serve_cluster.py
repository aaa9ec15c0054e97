"""The cluster on a local Ray cluster: a front and two avatar replicas (the tiny model, one session slot each),
real aiortc clients through the front's `/ws`, and a replica's process killed under a live session.

One cluster for the module (starting Ray and loading two replicas is most of the cost); the tests run in
file order, the kill last.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from cluster.serve_app import deploy
from model.config import load_config
from tests.cluster.stream_checks import check_frames_and_voice, speech_done
from tests.server.conftest import BARE_DECODE
from tests.server.webrtc_client import LoopbackClient

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
SPEECH_S = 3
RESTART_TIMEOUT_S = 240.0


@dataclass
class Cluster:
    url: str  # the front, ending in /

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "ws"


@pytest.fixture(scope="module")
def cluster():
    cfg = load_config(None, {"server.max_sessions": 1, "server.max_queued": 1, "server.stats_interval_s": 0.5,
                             "server.port": 0, **BARE_DECODE})  # model frames told apart from the reference
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}},
             _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False})
    try:
        yield Cluster(deploy(cfg, replicas=2))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            # the processes of this module's cluster that ray.shutdown() may leave behind
            ray_cli = Path(sys.executable).with_name("ray")
            ray_cli = str(ray_cli) if ray_cli.exists() else shutil.which("ray")
            if ray_cli:
                subprocess.run([ray_cli, "stop", "--force"], check=False, capture_output=True, timeout=60)


async def get_json(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.json()


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return await response.text()


async def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll an async predicate until it returns something truthy; fail naming `what` after `timeout_s`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


async def play(client: LoopbackClient, speech_s: float, until_s: float = 150.0) -> None:
    """Keep receiving until the speech has come back (or `until_s` passed since the answer)."""
    done = speech_done(speech_s)
    while time.monotonic() - client.connected_s < until_s:
        if done(client, time.monotonic() - client.connected_s):
            return
        await asyncio.sleep(0.25)


def answer_of(client: LoopbackClient) -> dict:
    return next(m for m in client.messages if m["type"] == "answer")


async def stream_format(cluster: Cluster) -> tuple[float, int]:
    _, health = await get_json(cluster.url + "healthz")
    status = health["replica_status"]["avatar_0"]
    return status["fps"], status["frames_per_clip"]


async def idle_and_ready(cluster: Cluster) -> dict | None:
    status, health = await get_json(cluster.url + "healthz")
    if status == 200 and health["replicas_ready"] == 2 and health["sessions"] == 0:
        return health
    return None


def samples_of(metrics_text: str, sample_name: str) -> dict[str, float]:
    """{replica: value} of one sample name in the front's exposition."""
    return {s.labels.get("replica", ""): s.value for family in text_string_to_metric_families(metrics_text)
            for s in family.samples if s.name == sample_name}


async def test_two_replicas_serve_two_pages_and_the_third_waits_its_turn(cluster, speech_pcm):
    await wait_for(lambda: idle_and_ready(cluster), 60, "both replicas ready")
    fps, frames_per_clip = await stream_format(cluster)
    speech = speech_pcm[: SPEECH_S * 48000]
    # built before any connects: each client patches aiortc's receiver to log RTP arrivals (webrtc_client.py)
    clients = [LoopbackClient(cluster.ws_url, speech, answer_timeout_s=180) for _ in range(3)]
    try:
        await asyncio.gather(clients[0].connect(), clients[1].connect())
        third = asyncio.create_task(clients[2].connect())
        await asyncio.gather(play(clients[0], SPEECH_S), play(clients[1], SPEECH_S))
        assert not third.done(), "the third page started while both slots were taken"
        queued = [m for m in clients[2].messages if m["type"] == "queued"]
        assert queued and queued[0]["position"] == 1, clients[2].messages
        assert "all 2 session slots" in queued[0]["message"]
        for client in clients[:2]:
            await client.close()
        await third
        await play(clients[2], SPEECH_S)
    finally:
        for client in clients:
            await client.close()

    placed = [answer_of(c)["replica"] for c in clients]
    assert sorted(placed[:2]) == ["avatar_0", "avatar_1"], placed
    assert placed[2] in ("avatar_0", "avatar_1")
    for client in clients:
        assert not client.errors(), client.errors()
        check_frames_and_voice(client, speech, fps, frames_per_clip)

    metrics = await get_text(cluster.url + "metrics")
    assert samples_of(metrics, "liveavatar_replica_up") == {"avatar_0": 1.0, "avatar_1": 1.0}
    started = samples_of(metrics, "liveavatar_sessions_started_total")
    assert set(started) == {"avatar_0", "avatar_1"} and sum(started.values()) == 3, started
    clips = samples_of(metrics, "liveavatar_clips_generated_total")
    assert clips["avatar_0"] >= 1 and clips["avatar_1"] >= 1, clips
    assert sum(samples_of(metrics, "liveavatar_front_sessions_placed_total").values()) == 3


async def test_a_killed_replica_fails_its_session_then_comes_back_and_serves(cluster, speech_pcm):
    health = await wait_for(lambda: idle_and_ready(cluster), 60, "both replicas ready and idle")
    fps, frames_per_clip = await stream_format(cluster)
    speech = np.tile(speech_pcm, 4)  # long enough to still be talking when its replica dies
    client = LoopbackClient(cluster.ws_url, speech, answer_timeout_s=60)
    try:
        await client.connect()
        victim = answer_of(client)["replica"]
        assert victim == "avatar_0", "with both idle, the first by name is the least loaded"
        old_pid = health["replica_status"][victim]["pid"]

        async def clip_played():
            return any(s["clips_played"] >= 1 for s in client.stats())

        await wait_for(clip_played, 90, "the session's first clip")
        os.kill(old_pid, signal.SIGKILL)

        async def told():
            return [e["code"] for e in client.errors()]

        codes = await wait_for(told, 60, "the page to hear of its replica's death")
        await asyncio.sleep(1.0)  # the second message follows the first
        assert [e["code"] for e in client.errors()] == ["worker_failed", "connection_lost"], client.errors()
        assert victim in client.errors()[0]["message"], codes
    finally:
        await client.close()

    async def restarted():
        _, health = await get_json(cluster.url + "healthz")
        status = health["replica_status"][victim]
        return status["ready"] and status["pid"] != old_pid and health["sessions"] == 0

    await wait_for(restarted, RESTART_TIMEOUT_S, f"Serve to bring {victim} back")
    metrics = await get_text(cluster.url + "metrics")
    assert samples_of(metrics, "liveavatar_front_replica_failures_total")[victim] >= 1

    short = speech_pcm[: SPEECH_S * 48000]
    again = LoopbackClient(cluster.ws_url, short, answer_timeout_s=60)
    try:
        await again.connect()
        await play(again, SPEECH_S)
    finally:
        await again.close()
    assert answer_of(again)["replica"] == victim, "the restarted replica, idle and first by name, takes it"
    assert not again.errors(), again.errors()
    check_frames_and_voice(again, short, fps, frames_per_clip)
