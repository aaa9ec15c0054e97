#!/usr/bin/env python3
"""Soak: a long stretch of microphone audio through the live path, counting every clip and watching memory.

    python bench/soak.py --audio_s 3600 [--size 64*64] [--out soak.json] [--max_wall_s N]

The path is the server's own: 20 ms decoded mic frames -> `Session.push_audio` (the audio window cutter,
the playout clock, the returned-voice buffer) -> `ModelEngine` (the real model on its worker) -> the
avatar video track, whose `recv()` runs the whole time as aiortc's sender would call it. Audio is fed
as fast as the model takes it (faster than real time when the model is; on a 2-core CPU it is slower),
never so fast that a window would be dropped, so every window must come back as a played clip.
RSS is sampled (after returning freed heap to the OS) every `--sample_every_s` of audio.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import AppConfig, load_config
from server.engine import ModelEngine
from server.reference_image import drawn_reference
from server.session import Session
from tests.server.reliability_support import mic_frames


@dataclass
class SoakResult:
    """What a soak proves: clips in == clips out, nothing dropped or failed, memory flat."""

    audio_s: float
    wall_s: float
    windows: int
    clips_done: int
    clips_played: int
    clips_dropped: int
    clips_failed: int
    video_frames_sent: int
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (audio seconds, RSS MB)

    @property
    def clips_lost(self) -> int:
        return self.windows - self.clips_played

    @property
    def rss_growth_mb(self) -> float:
        """Growth from the first sample after warm-up (10% of the run) to the last."""
        if len(self.rss_mb) < 2:
            return 0.0
        start = self.rss_mb[max(1, len(self.rss_mb) // 10)][1] if len(self.rss_mb) > 2 else self.rss_mb[0][1]
        return self.rss_mb[-1][1] - start

    def summary(self) -> dict:
        return {**asdict(self), "clips_lost": self.clips_lost, "rss_growth_mb": round(self.rss_growth_mb, 1),
                "speed_x_real_time": round(self.audio_s / self.wall_s, 3) if self.wall_s else None}


def rss_mb() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss / 2**20


async def _drain(track, sent: list[int]) -> None:
    """Pull frames as aiortc's RTP sender would, for as long as the track lives."""
    from aiortc.mediastreams import MediaStreamError

    while True:
        try:
            await track.recv()
        except MediaStreamError:
            return
        sent[0] += 1


async def run_soak(cfg: AppConfig, audio_s: float, sample_every_s: float = 30.0, max_wall_s: float | None = None,
                   engine: ModelEngine | None = None, progress=None) -> SoakResult:
    """Feed `audio_s` seconds of mic audio through one live session; stop early after `max_wall_s`."""
    own_engine = engine is None
    if own_engine:
        engine = ModelEngine(cfg)
        await engine.load()
    session = Session(cfg, engine, drawn_reference())
    await session.start(session.reference_rgb, cfg.server.prompt)
    video_sent, audio_sent = [0], [0]
    pumps = [asyncio.create_task(_drain(session.video_track, video_sent)),
             asyncio.create_task(_drain(session.audio_track, audio_sent))]
    result = SoakResult(audio_s=0.0, wall_s=0.0, windows=0, clips_done=0, clips_played=0, clips_dropped=0,
                        clips_failed=0, video_frames_sent=0)
    started = time.monotonic()
    chunk_s = 1.0
    next_sample_s = 0.0
    try:
        fed_s = 0.0
        while fed_s < audio_s - 1e-9:
            if max_wall_s is not None and time.monotonic() - started > max_wall_s:
                break
            if fed_s >= next_sample_s:
                result.rss_mb.append((round(fed_s, 2), round(rss_mb(), 1)))
                next_sample_s += sample_every_s
                if progress:
                    progress(result, fed_s, time.monotonic() - started)
            for frame in mic_frames(min(chunk_s, audio_s - fed_s), start_s=fed_s, seed=int(fed_s)):
                result.windows += session.push_audio(frame)
                # pace by the model: at most one window waiting behind the one in work, so none is dropped
                while engine.stats(session.session_id).queue_depth > 1:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0)
            fed_s += min(chunk_s, audio_s - fed_s)

        def accounted() -> int:  # every window ends played, failed or dropped
            return session.clips_played + session.clips_failed + engine.stats(session.session_id).clips_dropped

        def engine_accounted() -> int:  # the engine counts a clip done just after its last part reaches the session
            stats = engine.stats(session.session_id)
            return stats.clips_done + stats.clips_dropped + session.clips_failed

        while accounted() < result.windows or engine_accounted() < result.windows:
            await asyncio.sleep(0.01)
        stats = engine.stats(session.session_id)
        result.audio_s = fed_s
        result.wall_s = time.monotonic() - started
        result.clips_done = stats.clips_done
        result.clips_dropped = stats.clips_dropped
        result.clips_played = session.clips_played
        result.clips_failed = session.clips_failed
        result.video_frames_sent = video_sent[0]
        result.rss_mb.append((round(fed_s, 2), round(rss_mb(), 1)))
    finally:
        await session.close()
        await asyncio.gather(*pumps, return_exceptions=True)
        if own_engine:
            await engine.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML preset (default: configs/tiny.yaml)")
    parser.add_argument("--audio_s", type=float, default=3600.0, help="seconds of mic audio to feed")
    parser.add_argument("--size", default="64*64", help="video.size override (WIDTH*HEIGHT)")
    parser.add_argument("--sample_every_s", type=float, default=60.0, help="RSS sample interval, audio seconds")
    parser.add_argument("--max_wall_s", type=float, default=None, help="stop feeding after this many seconds")
    parser.add_argument("--out", default=None, help="write the summary JSON here")
    args = parser.parse_args()
    cfg = load_config(args.config, {"video.size": args.size, "runtime.num_threads": 1})

    def progress(result: SoakResult, fed_s: float, wall_s: float) -> None:
        print(f"[{wall_s:7.0f} s] audio {fed_s:7.0f} s, windows {result.windows}, "
              f"rss {result.rss_mb[-1][1]:.1f} MB", flush=True)

    result = asyncio.run(run_soak(cfg, args.audio_s, args.sample_every_s, args.max_wall_s, progress=progress))
    summary = result.summary()
    print(json.dumps({k: v for k, v in summary.items() if k != "rss_mb"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0 if result.clips_lost == 0 and result.clips_dropped == 0 and result.clips_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
