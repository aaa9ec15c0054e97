#!/usr/bin/env python3
"""On the GPUs: the streaming DiT under Ulysses SP=N gives the latents of one process (and of per-layer sharding).

    torchrun --nproc-per-node 2 bench/check_sp.py [--set video.size 256*256 ...]

Every rank builds the same random weights (same seed), runs a few clips token-sharded, then rank 0
reruns them alone (SP=1) and prints the relative error; with --shard_weights the SP=N run also keeps
1/N of each layer's weights per rank. With `--set parallel.mode tpp --set sampler.kv_update per_step`
(sample_steps = N) the group runs one sampling step per rank instead, compared with per_step on one
process. Exit code 1 if the error is over the tolerance.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_bench import StreamDenoiser, _tpp_blocks, bench_config, build_dit
from model.parallel import group as parallel


def clips(dit, cfg, device, dtype, n: int) -> torch.Tensor:
    with torch.inference_mode():
        stream = StreamDenoiser(dit, cfg, device, dtype, cfg.sampler.sample_steps)
        return torch.cat([stream.clip(i) for i in range(n)], dim=2).float()


def tpp_clips(dit, cfg, group, dtype, n: int) -> torch.Tensor | None:
    """Rank 0: the clips through the step pipeline (the others follow); None on the other ranks."""
    from types import SimpleNamespace

    from model.parallel import tpp

    with torch.inference_mode():
        if group.rank != 0:
            tpp.follow(SimpleNamespace(dit=dit), cfg, group)
            return None
        driver = tpp.TppDriver(dit, cfg, group)
        try:
            blocks = [latents for _, _, latents, _ in _tpp_blocks(driver, cfg, group.device, dtype, n, session_id=0)]
        finally:
            driver.quit()
        return torch.cat(blocks, dim=2).float()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--shard_weights", action="store_true")
    p.add_argument("--tolerance", type=float, default=None)
    p.add_argument("--set", nargs=2, action="append", default=[])
    args = p.parse_args()
    cfg = bench_config(args.config, dict(args.set))
    group = parallel.start_group(cfg.runtime.device, cfg.model.dit.num_heads, mode=cfg.parallel.mode)
    parallel.check_step_pipeline(cfg, group.pp_size)
    dtype = getattr(torch, cfg.runtime.dtype)
    device = group.device
    if cfg.parallel.mode == "tpp":
        sharded = tpp_clips(build_dit(cfg, group, dtype, False), cfg, group, dtype, args.clips)
    else:
        sharded = clips(build_dit(cfg, group, dtype, args.shard_weights), cfg, device, dtype, args.clips)
    group.barrier()
    ok = True
    if group.rank == 0:
        single = parallel.ParallelGroup(parallel.GroupLayout(1, 0, 1, None), device, None)
        previous = parallel.set_current(single)
        alone = clips(build_dit(cfg, single, dtype, False), cfg, device, dtype, args.clips)
        parallel.set_current(previous)
        rel = ((sharded - alone).norm() / alone.norm()).item()
        tol = args.tolerance or (1e-4 if dtype == torch.float32 else 3e-2)
        ok = rel <= tol and torch.isfinite(sharded).all().item()
        print(f"CHECK {cfg.parallel.mode} ranks={group.world_size} sp={group.sp_size} shard_weights={args.shard_weights} dtype={cfg.runtime.dtype} "
              f"size={cfg.video.size} clips={args.clips} rel_err={rel:.2e} tol={tol:.0e} {'OK' if ok else 'FAIL'}",
              flush=True)
    group.barrier()
    group.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
