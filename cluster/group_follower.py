"""A follower rank of a replica's GPU group (started by cluster/group.py, never by hand):

    python -m cluster.group_follower CONFIG.pkl   # with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set

It joins the group, loads its share of the model and runs rank 0's clip jobs until rank 0 releases it.
"""
from __future__ import annotations

import ctypes
import pickle
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: the kernel kills this rank when rank 0 (the replica) goes, however it goes."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: rank 0's release (or the group's timeout) ends it


def main(argv: list[str]) -> int:
    die_with_parent()
    with Path(argv[0]).open("rb") as handle:
        cfg = pickle.load(handle)
    from model.parallel.followers import follow
    from model.parallel.group import start_group_from_config
    from model.stream.avatar import AvatarModels

    group = start_group_from_config(cfg)
    try:
        follow(AvatarModels.load(cfg), cfg, group)
    finally:
        group.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
