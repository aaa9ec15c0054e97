#!/usr/bin/env python3
"""200 full WebRTC connect/stream/vanish cycles against one server; memory, threads and fds before and after.

    python bench/webrtc_cycles.py [--cycles 200] [--out cycles.json]

Each cycle is a real aiortc client over loopback (ICE, DTLS, SRTP, Opus up, VP8 and Opus down) that
streams audio until the tiny model (64*64, 4-frame clips) has a clip of it in work, then vanishes in
turn: websocket dropped without a close frame, peer connection closed with the websocket left open,
or an answer never applied (ICE never completes; the server's connect timeout frees the slot).
The CI test (tests/server/test_lifecycle.py) runs 200 cycles of the signaling path and 6 of these.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server.reliability_support import running_server, settle_and_count, small_cfg
from tests.server.test_lifecycle import SHORT_CLIP, webrtc_cycle

WAYS = ("websocket_dropped", "pc_closed", "ice_failure")


async def run(cycles: int) -> dict:
    cfg = small_cfg(**SHORT_CLIP, **{"server.connect_timeout_s": 3.0})
    speech = (np.random.default_rng(0).standard_normal(48000 * 30) * 3000).astype(np.int16)
    samples = []
    async with running_server(cfg) as (server, engine):
        for way in WAYS:  # warm-up
            await webrtc_cycle(server, engine, speech, way)
        before = await settle_and_count(1.0)
        started = time.monotonic()
        for i in range(cycles):
            await webrtc_cycle(server, engine, speech, WAYS[i % 3])
            if (i + 1) % 25 == 0:
                counts = await settle_and_count(0.5)
                samples.append({"cycle": i + 1, "rss_mb": round(counts.rss_mb, 1), "threads": counts.threads,
                                "fds": counts.fds, "tasks": counts.tasks})
                print(f"[{time.monotonic() - started:6.0f} s] cycle {i + 1}: {counts}", flush=True)
        elapsed_s = time.monotonic() - started
        after = await settle_and_count(2.0)
    return {"cycles": cycles, "elapsed_s": round(elapsed_s, 1),
            "before": {"rss_mb": round(before.rss_mb, 1), "threads": before.threads, "fds": before.fds,
                       "tasks": before.tasks},
            "after": {"rss_mb": round(after.rss_mb, 1), "threads": after.threads, "fds": after.fds,
                      "tasks": after.tasks},
            "samples": samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = asyncio.run(run(args.cycles))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
