"""A shortened soak in CI: two minutes of mic audio through the live path (bench/soak.py runs the hour)."""
from __future__ import annotations

import pytest

from bench.soak import run_soak
from tests.server.reliability_support import small_cfg

pytestmark = pytest.mark.timeout(600)


async def test_two_minutes_of_audio_lose_no_clip_and_memory_stays_flat():
    cfg = small_cfg()
    result = await run_soak(cfg, audio_s=120.0, sample_every_s=10.0)
    print("\nsoak:", {k: v for k, v in result.summary().items() if k != "rss_mb"})
    clip_s = cfg.video.infer_frames / cfg.video.fps
    assert result.audio_s == 120.0
    assert int(120.0 / clip_s) - 1 <= result.windows <= int(120.0 / clip_s)  # the resampler keeps a few ms
    assert result.clips_done == result.windows
    assert result.clips_lost == 0 and result.clips_dropped == 0 and result.clips_failed == 0
    assert result.video_frames_sent > 0
    assert result.rss_growth_mb < 30.0, result.rss_mb
