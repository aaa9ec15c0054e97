#!/usr/bin/env python3
"""Sessions one avatar replica keeps in real time: the cluster path (Ray Serve, the front, WebRTC) with one
replica of the tiny preset on `--cpus_per_replica` CPUs, and 1, 2, 3 ... live sessions on it in turn.

    .venv/bin/python bench/cluster_capacity.py [--sessions 1 2 3] [--seconds 20] [--cpus_per_replica 1]

Each session's microphone plays noise (the model's cost does not depend on what is said). Per row it prints
the model time per clip (mean over the clips of every session), the clip length, the replica's load factor
(sessions x model time / clip length: above 1 it cannot keep up), clips dropped, the playout latency at the
middle and the end of the run (growing = falling behind) and the slowest session's received fps. The numbers
depend on how busy the machine is: run it on a quiet one.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server.webrtc_client import LoopbackClient


def generation_ms(client: LoopbackClient) -> list[float]:
    """Model time of each clip of one session (one value per clip index)."""
    seen: dict[int, float] = {}
    for stats in client.stats():
        if stats["clip_index"] is not None and stats["generation_ms"] is not None:
            seen.setdefault(stats["clip_index"], stats["generation_ms"])
    return list(seen.values())


async def replica_pid(url: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(url + "healthz") as response:
        return (await response.json())["replica_status"]["avatar_0"]["pid"]


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds each thread of the replica's process has used: unlike wall time, other jobs on the machine
    hardly inflate it."""
    import psutil

    return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def split_cpu_s(before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
    """(model worker, everything else) CPU seconds between two samples. The model runs on one thread (the
    engine's worker, torch at one thread), the busiest one; the rest is the event loop's WebRTC, codecs, playout."""
    deltas = sorted((after[tid] - before.get(tid, 0.0) for tid in after), reverse=True)
    return (deltas[0], sum(deltas[1:])) if deltas else (0.0, 0.0)


async def measure(url: str, sessions: int, seconds: float) -> dict:
    ws_url = url.replace("http://", "ws://") + "ws"
    pid = await replica_pid(url)
    cpu_before, wall_before_s = thread_cpu_s(pid), time.monotonic()
    rng = np.random.default_rng(0)
    clients = [LoopbackClient(ws_url, (rng.standard_normal(48000 * int(seconds + 60)) * 3000).astype(np.int16),
                              answer_timeout_s=60) for _ in range(sessions)]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        started = time.monotonic()
        await asyncio.sleep(seconds / 2)
        middle = [c.stats()[-1]["latency_ms"] for c in clients if c.stats()]
        frames_middle = [len(c.video) for c in clients]
        await asyncio.sleep(seconds / 2)
        half_s = time.monotonic() - started - seconds / 2
        end = [c.stats()[-1]["latency_ms"] for c in clients if c.stats()]
        fps = [(len(c.video) - f) / half_s for c, f in zip(clients, frames_middle, strict=True)]
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    (model_cpu_s, other_cpu_s), wall_s = split_cpu_s(cpu_before, thread_cpu_s(pid)), time.monotonic() - wall_before_s
    last = [c.stats()[-1] for c in clients if c.stats()]
    gen = [ms for c in clients for ms in generation_ms(c)]
    clip_ms = last[0]["clip_ms"] if last else float("nan")
    mean_gen = statistics.fmean(gen) if gen else float("nan")
    return {"sessions": sessions, "gen_ms": mean_gen, "clip_ms": clip_ms, "load": sessions * mean_gen / clip_ms,
            "dropped": sum(s["clips_dropped"] for s in last), "done": sum(s["clips_done"] for s in last),
            "latency_mid_ms": max((v for v in middle if v is not None), default=None),
            "latency_end_ms": max((v for v in end if v is not None), default=None),
            "min_fps": min(fps) if fps else 0.0, "cores": (model_cpu_s + other_cpu_s) / wall_s,
            "model_cpu_ms_per_clip": 1000 * model_cpu_s / max(1, sum(s["clips_done"] for s in last)),
            "other_cpu_per_session": other_cpu_s / wall_s / sessions,
            "errors": [e for c in clients for e in c.errors()]}


def per_core(row: dict) -> float:
    """Sessions one core keeps in real time: each needs the model's CPU for a clip every clip length, plus the
    rest (codecs, WebRTC) all the time."""
    need = row["model_cpu_ms_per_clip"] / row["clip_ms"] + row["other_cpu_per_session"]
    return 1.0 / need if need > 0 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per row, after connecting")
    parser.add_argument("--cpus_per_replica", type=float, default=1.0)
    parser.add_argument("--config", default=None)
    args = parser.parse_args()

    import ray
    from ray import serve

    from cluster.serve_app import deploy
    from model.config import load_config

    threads = str(max(1, int(args.cpus_per_replica)))
    cfg = load_config(args.config, {"server.max_sessions": max(args.sessions), "server.port": 0,
                                    "server.stats_interval_s": 0.5})
    ray.init(num_cpus=max(1, int(args.cpus_per_replica)), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads}})
    try:
        url = deploy(cfg, replicas=1, cpus_per_replica=args.cpus_per_replica)
        load = os.getloadavg()[0]
        print(f"one replica, {args.cpus_per_replica:g} CPU(s), torch threads {threads}; load average at start "
              f"{load:.1f} on {os.cpu_count()} cores")
        print("| sessions | model ms/clip (wall) | clip ms | load factor | clips done | dropped | latency mid -> end ms "
              "| slowest fps | replica cores used | model CPU ms per clip | other CPU per session (cores) "
              "| sessions per core |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for sessions in args.sessions:
            row = asyncio.run(measure(url, sessions, args.seconds))
            print(f"| {sessions} | {row['gen_ms']:.0f} | {row['clip_ms']:.0f} | {row['load']:.2f} | {row['done']} "
                  f"| {row['dropped']} | {row['latency_mid_ms']} -> {row['latency_end_ms']} | {row['min_fps']:.1f} "
                  f"| {row['cores']:.2f} | {row['model_cpu_ms_per_clip']:.0f} | {row['other_cpu_per_session']:.3f} "
                  f"| {per_core(row):.1f} |"
                  + (f" errors: {row['errors']}" if row["errors"] else ""), flush=True)
            time.sleep(2.0)  # the sessions' slots free before the next row
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
