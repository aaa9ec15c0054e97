"""Run a function in a real N-process gloo group on the CPU, as torchrun would start it."""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
import torch.multiprocessing as mp

from model.io_types import AudioWindow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch

    torch.set_num_threads(1)
    results[rank] = fn(*args)


def run_in_group(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Start `world_size` processes with torchrun's environment, run `fn(*args)` in each, return each result."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_entry, args=(world_size, free_port(), fn, args, results), nprocs=world_size,
                           join=True, start_method="spawn")
        return [results[r] for r in range(world_size)]


def random_session_inputs(context_samples: int, clip_samples: int, clips: int) -> tuple[np.ndarray, list[AudioWindow]]:
    """A random reference image and `clips` windows of quiet noise: the same on every rank (fixed seed)."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(96, 80, 3), dtype=np.uint8)
    windows = []
    for i in range(clips):
        samples = (0.1 * rng.standard_normal(context_samples + clip_samples)).astype(np.float32)
        windows.append(AudioWindow(samples, context_samples, t0=i * clip_samples / 16000, clip_index=i))
    return image, windows
