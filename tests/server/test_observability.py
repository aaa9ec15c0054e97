"""Observability: /healthz says whether the server can take sessions; /metrics (Prometheus text) counts
sessions, clips, generation seconds, queue depth, dropped frames and errors by kind, from a real session."""
from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.server.reliability_support import (
    JsonSocket,
    mic_frames,
    offer_sdp,
    running_server,
    session_by_id,
    small_cfg,
)


async def scrape(server) -> dict[tuple[str, tuple], float]:
    async with aiohttp.ClientSession() as http, http.get(server.url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_healthz_and_metrics_follow_a_live_session(monkeypatch):
    monkeypatch.delenv("LIVEAVATAR_TOKEN", raising=False)
    cfg = small_cfg(**{"video.infer_frames": 4, "model.dit.num_frames_per_block": 1, "server.max_pending_clips": 1})
    async with running_server(cfg) as (server, engine):
        async with aiohttp.ClientSession() as http, http.get(server.url + "/healthz") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok", "model_loaded": True, "worker_alive": True,
                                              "worker_restarts": 0, "sessions": 0, "max_sessions": 2,
                                              "queue_depth": 0}
        ws = await JsonSocket.connect(server.ws_url)
        pc, sdp = await offer_sdp()
        try:
            assert (await ws.request("{broken"))["code"] == "bad_json"
            answer = await ws.request({"type": "offer", "sdp": sdp})
            session = session_by_id(server, answer["session_id"])
            # 2 s of audio at once: 8 windows, one in work and one waiting at a time, so some are dropped
            windows = sum(session.push_audio(frame) for frame in mic_frames(2.1))  # the resampler holds back a few ms
            assert windows == 8
            await asyncio.sleep(0.05)
            live = await scrape(server)
            for _ in range(300):
                stats = engine.stats(session.session_id)
                if stats.clips_done + stats.clips_dropped >= windows:
                    break
                await asyncio.sleep(0.05)
            done = await scrape(server)
            async with aiohttp.ClientSession() as http, http.get(server.url + "/healthz") as response:
                health = await response.json()
        finally:
            await ws.close()
            await pc.close()
    frames_per_clip = engine.stream_format.frames_per_clip
    assert live[("liveavatar_sessions", ())] == 1.0
    assert live[("liveavatar_queue_depth", ())] >= 1.0
    assert health["sessions"] == 1 and health["status"] == "ok"
    assert done[("liveavatar_sessions_started_total", ())] == 1.0
    assert done[("liveavatar_clips_generated_total", ())] == stats.clips_done >= 1
    assert stats.clips_dropped >= 1 and stats.clips_done + stats.clips_dropped == windows
    assert done[("liveavatar_frames_dropped_total", ())] == stats.clips_dropped * frames_per_clip
    assert done[("liveavatar_generation_seconds_count", ())] == stats.clips_done
    assert done[("liveavatar_generation_seconds_sum", ())] > 0
    assert done[("liveavatar_errors_total", (("kind", "bad_json"),))] == 1.0
    assert done[("liveavatar_model_loaded", ())] == 1.0 and done[("liveavatar_worker_alive", ())] == 1.0
    assert done[("liveavatar_worker_restarts_total", ())] == 0.0
