"""The page in a real browser: headless Chromium with a fake mic plays the avatar the server sends."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from playwright.async_api import async_playwright

from tests.server.conftest import start_server

pytestmark = pytest.mark.timeout(180)

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def chromium_args(wav: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"]


async def wait_for(page, expression: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await page.evaluate(expression):
        if time.monotonic() > deadline:
            shown = await page.evaluate("[document.getElementById('status').textContent, "
                                        "document.getElementById('error').textContent]")
            raise AssertionError(f"timed out after {timeout_s} s waiting for {expression}; page shows {shown}")
        await asyncio.sleep(0.25)


async def test_page_starts_and_plays_the_avatar_video(tiny_engine, tiny_cfg, speech_wav, tmp_path):
    assert Path(CHROMIUM).exists(), "chromium is required (make setup installs it)"
    server, runner = await start_server(tiny_cfg, tiny_engine)
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=chromium_args(speech_wav))
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                await page.goto(server.url + "/")
                await page.click("#start")
                await wait_for(page, "window.avatarPage.framesDecoded > 0", timeout_s=30)
                decoded_before = await page.evaluate("window.avatarPage.framesDecoded")
                # a clip made from the fake mic's speech has played, and frames keep coming
                await wait_for(page, "(window.avatarPage.serverStats?.clip_frames_sent ?? 0) > 0", timeout_s=90)
                await asyncio.sleep(1.5)
                decoded_after = await page.evaluate("window.avatarPage.framesDecoded")
                video = await page.evaluate("""() => { const v = document.getElementById('avatar');
                    return {paused: v.paused, readyState: v.readyState, time: v.currentTime,
                            width: v.videoWidth, height: v.videoHeight}; }""")
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "browser_live_avatar.png"))
                stats = await page.evaluate("window.avatarPage.serverStats")
                error = await page.evaluate("document.getElementById('error').textContent")
            finally:
                await context.close()
    finally:
        await runner.cleanup()
    assert error == ""
    assert decoded_after > decoded_before, (decoded_before, decoded_after)
    assert not video["paused"] and video["readyState"] >= 2 and video["time"] > 0, video
    assert (video["height"], video["width"]) == tiny_engine.stream_format.frame_size
    assert stats["clip_frames_sent"] > 0 and stats["latency_ms"] > 0, stats


async def test_kiosk_without_a_microphone_shows_the_avatar_and_speaks_what_a_bot_sends(tiny_engine, tiny_cfg,
                                                                                      speech_wav, tmp_path):
    """No microphone at all (no fake device): the kiosk page still connects, shows its session id and the idle
    avatar, and plays the speech a bot posts to /sessions/{id}/speak."""
    import aiohttp

    from tests.server.reliability_support import server_state

    server, runner = await start_server(tiny_cfg, tiny_engine)
    args = [a for a in chromium_args(speech_wav) if "fake-device" not in a and "fake-audio" not in a]
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=args)
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                await page.goto(server.url + "/?kiosk=1")
                await wait_for(page, "window.avatarPage.framesDecoded > 0", timeout_s=60)
                session_id = await page.evaluate("window.avatarPage.sessionId")
                assert session_id and await page.evaluate("document.getElementById('r-session').textContent") \
                    == session_id
                assert await page.evaluate("window.avatarPage.hasMic") is False
                session = next(s for s in server_state(server).sessions if s.session_id == session_id)
                assert session.kind == "browser" and not session.has_mic
                async with aiohttp.ClientSession() as http, http.post(
                        f"{server.url}/sessions/{session_id}/speak", data=speech_wav.read_bytes()[: 44 + 3 * 96000],
                        headers={"Content-Type": "audio/wav"}) as response:
                    assert response.status == 202, await response.text()
                clips_before = session.clips_played
                deadline = time.monotonic() + 90
                while not (session.speech.queue.utterances_spoken and session.clips_played > clips_before + 2):
                    assert time.monotonic() < deadline, "the bot's speech was not spoken"
                    await asyncio.sleep(0.25)
                await wait_for(page, "(window.avatarPage.serverStats?.clip_frames_sent ?? 0) > 0", timeout_s=30)
                decoded_before = await page.evaluate("window.avatarPage.framesDecoded")
                await asyncio.sleep(1.5)
                decoded_after = await page.evaluate("window.avatarPage.framesDecoded")
                audio_bytes = await page.evaluate("""async () => { let n = 0;
                    (await window.avatarPage.pc.getStats()).forEach((r) => {
                        if (r.type === 'inbound-rtp' && r.kind === 'audio') n = r.bytesReceived; });
                    return n; }""")
                error = await page.evaluate("document.getElementById('error').textContent")
            finally:
                await context.close()
    finally:
        await runner.cleanup()
    assert error == "", error
    assert decoded_after > decoded_before, (decoded_before, decoded_after)
    assert session.speech.queue.utterances_spoken == 1 and session.clips_played > clips_before
    assert audio_bytes > 0, "the kiosk received no audio"


async def test_the_whep_player_page_plays_an_api_session(tiny_engine, tiny_cfg, speech_wav, tmp_path):
    """/static/whep.html (the player an OBS Browser Source opens) shows an API session's avatar."""
    import aiohttp

    from tests.server.reliability_support import server_state

    server, runner = await start_server(tiny_cfg, tiny_engine)
    try:
        async with aiohttp.ClientSession() as http, http.post(server.url + "/sessions", json={}) as response:
            session_id = (await response.json())["id"]
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=chromium_args(speech_wav))
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                await page.goto(f"{server.url}/static/whep.html?session={session_id}")
                playing = "(() => { const v = document.getElementById('avatar'); " \
                          "return v.readyState >= 2 && v.videoWidth > 0 && v.currentTime > 0.5; })()"
                await wait_for(page, playing, timeout_s=60)
                session = next(s for s in server_state(server).sessions if s.session_id == session_id)
                assert len(session.viewers) == 1
                size = await page.evaluate("[document.getElementById('avatar').videoHeight, "
                                           "document.getElementById('avatar').videoWidth]")
            finally:
                await context.close()
    finally:
        await runner.cleanup()
    assert tuple(size) == tiny_engine.stream_format.frame_size
