"""A replica that is a group of 2 ranks (gloo on the CPU, the code path of a 2-GPU replica): the follower rank
starts, the engine's clips run across both, and closing the replica releases the follower."""
from __future__ import annotations

import numpy as np
import pytest

from cluster.replica import AvatarReplica
from model.config import load_config
from model.io_types import AudioWindow

pytestmark = pytest.mark.timeout(300)


async def test_a_two_rank_replica_makes_clips_and_releases_its_follower():
    cfg = load_config(None, {"server.max_sessions": 1})
    replica = AvatarReplica(cfg, ranks=2)
    await replica.start()
    try:
        assert replica.status()["ready"] and replica.status()["ranks"] == 2
        assert replica.group.group.world_size == 2 and replica.group.group.sp_size == 2
        engine = replica.engine
        fmt = engine.stream_format
        await engine.start("s", replica.state.default_reference, "a face")
        samples = np.zeros(fmt.context_samples + fmt.clip_samples, np.float32)
        clip = await engine.submit("s", AudioWindow(samples, fmt.context_samples, 0.0, 0))
        assert clip.final and clip.frames.shape[-3:] == (*fmt.frame_size, 3)
        await engine.stop("s")
        followers = replica.group.followers
    finally:
        await replica.close()
    assert [child.returncode for child in followers] == [0], "the follower rank did not leave cleanly"
