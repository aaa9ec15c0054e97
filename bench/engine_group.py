#!/usr/bin/env python3
"""The server's own model path on a GPU group, without the network: load, warm up, serve one session.

    torchrun --nproc-per-node 2 bench/engine_group.py --config configs/liveavatar_14b.yaml \
        --set parallel.shard_weights true --set runtime.fp8 gemm --mem_cap_gb 22 --clips 4

Rank 0 runs `server.engine.ModelEngine` exactly as `run_server.py` does (its `load()` includes the
`runtime.warmup_clips` warm-up), the other ranks run `model.parallel.followers.follow`. Prints the load and
warm-up time, each clip's time from window in to last frame out, the first part's time, and every rank's
peak GPU memory, then one `ENGINE {...}` JSON line. Weights are random unless the config names a checkpoint.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import load_config
from model.io_types import AudioWindow
from model.parallel import group as parallel


def _peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


async def _serve(cfg, clips: int) -> dict:
    from server.engine import ModelEngine

    t0 = time.perf_counter()
    engine = ModelEngine(cfg)
    await engine.load()  # weights + warm-up
    load_s = time.perf_counter() - t0
    fmt = engine.stream_format
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (*fmt.frame_size, 3), dtype=np.uint8)
    await engine.start("bench", image, cfg.server.prompt)
    clip_s, first_part_s = [], []
    for k in range(clips):
        samples = (0.05 * rng.standard_normal(fmt.context_samples + fmt.clip_samples)).astype(np.float32)
        window = AudioWindow(samples, fmt.context_samples, k * fmt.clip_samples / fmt.sample_rate_hz, k)
        start = time.perf_counter()
        parts: list[tuple[float, int]] = []
        await engine.submit("bench", window,
                            on_part=lambda part, parts=parts: parts.append((time.perf_counter(), part.frames.shape[0])))
        clip_s.append(time.perf_counter() - start)
        first_part_s.append(parts[0][0] - start)
        assert sum(n for _, n in parts) == fmt.frames_per_clip, parts
    await engine.close()
    return {"load_and_warmup_s": load_s, "clip_s": clip_s, "first_part_s": first_part_s,
            "frames_per_clip": fmt.frames_per_clip, "frame_size": list(fmt.frame_size)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/liveavatar_14b.yaml")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--mem_cap_gb", type=float, default=None, help="per-process GPU memory cap")
    p.add_argument("--random_weights", action="store_true", help="ignore the config's checkpoint (none exist here)")
    args = p.parse_args(argv)
    overrides = dict(args.set)
    if args.random_weights:
        overrides["model.checkpoint"] = None
    cfg = load_config(args.config, overrides)
    group = parallel.start_group_from_config(cfg)
    if args.mem_cap_gb and group.device.type == "cuda":
        total = torch.cuda.get_device_properties(group.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gb * 2**30 / total), group.device)
    try:
        if group.rank == 0:
            from model.parallel.followers import release_followers

            try:
                result = asyncio.run(_serve(cfg, args.clips))
            finally:
                release_followers()
        else:
            from model.parallel.followers import follow
            from model.stream.avatar import AvatarModels

            result = {"followed_clips": follow(AvatarModels.load(cfg), cfg)}
        result["peak_gb"] = round(_peak_gb(group.device), 2)
        results = group.gather_objects(result)
        if group.rank == 0:
            row = {**results[0], "peak_gb_per_rank": [r["peak_gb"] for r in results], "gpus": group.world_size,
                   "shard_weights": cfg.parallel.shard_weights, "fp8": cfg.runtime.fp8,
                   "compile": cfg.runtime.compile, "warmup_clips": cfg.runtime.warmup_clips,
                   "mem_cap_gb": args.mem_cap_gb, "size": cfg.video.size}
            print("ENGINE " + json.dumps(row), flush=True)
    finally:
        group.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
