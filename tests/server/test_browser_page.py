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
