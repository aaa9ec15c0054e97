#!/usr/bin/env python3
"""Received video rate and clips per session with N concurrent WebRTC sessions on one tiny model.

    .venv/bin/python bench/concurrent_sessions.py [--sessions 8] [--seconds 3] [--frames 4] [--size 64*64]

The rate a session's video flows at depends on the machine (the model shares its cores with the codecs
and the event loop), so it is measured here, not asserted in the tests: `tests/server/test_load.py` checks
that frames and clips keep arriving in every session. After every session has played two clips, this
counts the frames each client received over `--seconds` and prints them as fps beside the model's fps.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server.reliability_support import running_server, small_cfg
from tests.server.webrtc_client import LoopbackClient


async def run(sessions: int, seconds: float, frames: int, size: str) -> dict:
    cfg = small_cfg(**{"server.max_sessions": sessions, "video.infer_frames": frames, "video.size": size,
                       "model.dit.num_frames_per_block": 1 if frames == 4 else 3})
    rng = np.random.default_rng(0)
    async with running_server(cfg) as (server, engine):
        clients = [LoopbackClient(server.ws_url, (rng.standard_normal(48000 * 120) * 3000).astype(np.int16))
                   for _ in range(sessions)]
        try:
            await asyncio.gather(*(c.connect() for c in clients))
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                if all(c.stats() and (c.stats()[-1]["clips_played"] or 0) >= 2 for c in clients):
                    break
            before = [len(c.video) for c in clients]
            started = time.monotonic()
            await asyncio.sleep(seconds)
            elapsed_s = time.monotonic() - started
            after = [len(c.video) for c in clients]
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    fps = [(a - b) / elapsed_s for a, b in zip(after, before)]
    return {"model_fps": engine.stream_format.fps, "received_fps": fps,
            "clips_played": [c.stats()[-1]["clips_played"] for c in clients]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--frames", type=int, default=4, help="video.infer_frames (4 = one-block clips)")
    parser.add_argument("--size", default="64*64")
    args = parser.parse_args()
    result = asyncio.run(run(args.sessions, args.seconds, args.frames, args.size))
    fps = np.array(result["received_fps"])
    print(f"{args.sessions} sessions on {os.cpu_count()} cores (load {os.getloadavg()[0]:.2f}): model "
          f"{result['model_fps']:g} fps; received fps min {fps.min():.1f} median {np.median(fps):.1f} "
          f"max {fps.max():.1f}; clips played {result['clips_played']}")


if __name__ == "__main__":
    main()
