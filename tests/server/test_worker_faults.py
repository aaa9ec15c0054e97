"""Faults: the model worker dies mid-clip; live sessions are told, the engine restarts the worker, new
sessions work again. The worker is killed as a crash would end it (an exception raised inside its thread
at its next Python instruction), and separately by a fatal error escaping the model code."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest

from server.worker import WorkerKilled
from tests.server.reliability_support import running_server, server_state, small_cfg
from tests.server.webrtc_client import LoopbackClient

pytestmark = pytest.mark.timeout(300)

SHORT_CLIP = {"video.infer_frames": 4, "model.dit.num_frames_per_block": 1}


async def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def health(server) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(server.url + "/healthz") as response:
        return response.status, await response.json()


def noise(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(48000 * seconds)) * 3000).astype(np.int16)


async def stream_until_clips(server, clips: int, seed: int) -> LoopbackClient:
    client = LoopbackClient(server.ws_url, noise(60, seed))
    await client.connect()
    assert not client.errors(), client.errors()
    await wait_until(lambda: client.stats() and (client.stats()[-1]["clips_played"] or 0) >= clips, 60,
                     f"{clips} clips played")
    return client


@pytest.mark.parametrize("fault", ["killed", "fatal_error_in_model"])
async def test_live_sessions_hear_of_a_dead_worker_and_new_sessions_work_after_restart(fault, monkeypatch):
    cfg = small_cfg(**SHORT_CLIP, **{"server.max_sessions": 3})
    async with running_server(cfg) as (server, engine):
        clients = [await stream_until_clips(server, 1, seed) for seed in range(2)]
        try:
            await wait_until(lambda: engine.queue_depth >= 1, 20, "a clip in work")
            if fault == "killed":
                engine.kill_worker()
            else:
                from model.stream.avatar import StreamingAvatar

                def crash(self, window, sample_steps=None):
                    raise WorkerKilled("simulated fatal error in the model (e.g. a lost GPU)")

                monkeypatch.setattr(StreamingAvatar, "next_clip", crash)
                monkeypatch.setattr(StreamingAvatar, "clip_parts", crash)  # what the live path runs
            for client in clients:
                await wait_until(lambda c=client: any(e["code"] == "worker_failed" for e in c.errors()), 30,
                                 "the worker_failed error")
                error = next(e for e in client.errors() if e["code"] == "worker_failed")
                assert "the model worker died" in error["message"] and "start again" in error["message"]
            await wait_until(lambda: not server_state(server).sessions, 30, "the lost sessions to close")
            monkeypatch.undo()
            await wait_until(lambda: engine.worker_restarts == 1 and engine.worker_alive, 30, "the restart")
            status, report = await health(server)
            assert status == 200 and report["worker_alive"] and report["worker_restarts"] == 1
        finally:
            for client in clients:
                await client.close()

        # a new session on the restarted worker gets clips again
        fresh = await stream_until_clips(server, 2, seed=7)
        try:
            assert not fresh.errors(), fresh.errors()
        finally:
            await fresh.close()
        async with aiohttp.ClientSession() as http, http.get(server.url + "/metrics") as response:
            metrics = await response.text()
        assert "liveavatar_worker_restarts_total 1.0" in metrics
        assert 'liveavatar_errors_total{kind="worker_died"} 1.0' in metrics
        assert 'liveavatar_errors_total{kind="worker_failed"} 2.0' in metrics


async def test_health_reports_unavailable_while_the_worker_is_down():
    cfg = small_cfg(**SHORT_CLIP)
    async with running_server(cfg) as (server, engine):
        assert (await health(server))[0] == 200
        engine.kill_worker()
        assert engine._worker.join(5.0)
        status, report = await health(server)
        assert status == 503 and report == {**report, "status": "unavailable", "worker_alive": False}
        await wait_until(lambda: engine.worker_alive, 30, "the restart")
        assert (await health(server))[0] == 200
