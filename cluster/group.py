"""A replica that is a GPU group: this process is rank 0 (the engine, the sessions), ranks 1..N-1 are child
processes that follow its clip jobs, as under `torchrun --nproc-per-node N run_server.py`.

Ray reserves the replica's GPUs and sets CUDA_VISIBLE_DEVICES for this process; the children inherit it, so
rank r takes the r-th of them (cuda:LOCAL_RANK, model/parallel/group.py). The children die with this process
(the kernel sends them SIGKILL when it goes), so a replica that Serve restarts never finds stale ranks.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from model.config import AppConfig

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def group_env(ranks: int, rank: int, port: int) -> dict[str, str]:
    """What torchrun would set for one rank of a one-node group."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(ranks),
            "LOCAL_WORLD_SIZE": str(ranks), "RANK": str(rank), "LOCAL_RANK": str(rank)}


class ReplicaGroup:
    """Starts the follower ranks and joins the group as rank 0; `close` releases and reaps them."""

    def __init__(self, cfg: AppConfig, ranks: int) -> None:
        if ranks < 2:
            raise ValueError("a replica group has at least 2 ranks")
        self.cfg = cfg
        self.ranks = ranks
        self.group: Any = None
        self._children: list[subprocess.Popen] = []
        self._cfg_file: str | None = None

    @property
    def followers(self) -> list[subprocess.Popen]:
        """The follower ranks' processes (rank 1 first)."""
        return list(self._children)

    async def start(self) -> None:
        from model.parallel.group import start_group_from_config

        port = free_port()
        with tempfile.NamedTemporaryFile("wb", suffix=".cfg.pkl", delete=False) as handle:
            pickle.dump(self.cfg, handle)
            self._cfg_file = handle.name
        # from this thread, which lives as long as the replica: a child's death signal follows its parent thread
        self._spawn_followers(port)
        os.environ.update(group_env(self.ranks, 0, port))
        log.info("replica group: %d ranks (followers pid %s), rendezvous on port %d", self.ranks,
                 [child.pid for child in self._children], port)
        self.group = await asyncio.to_thread(start_group_from_config, self.cfg)

    def _spawn_followers(self, port: int) -> None:
        for rank in range(1, self.ranks):
            env = {**os.environ, **group_env(self.ranks, rank, port), "PYTHONPATH": str(ROOT)}
            self._children.append(subprocess.Popen([sys.executable, "-m", "cluster.group_follower", self._cfg_file],
                                                   env=env, cwd=str(ROOT)))

    async def close(self) -> None:
        from model.parallel.followers import release_followers

        if self.group is not None:
            await asyncio.to_thread(release_followers, self.group)
        for child in self._children:
            try:
                await asyncio.to_thread(child.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("follower rank pid %d did not leave; killing it", child.pid)
                child.kill()
        if self.group is not None:
            self.group.shutdown()
            self.group = None
        if self._cfg_file is not None:
            Path(self._cfg_file).unlink(missing_ok=True)
