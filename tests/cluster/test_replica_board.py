"""The front's view of replica readiness: a replica found gone takes no session until a status probe started
after the failure says it is ready; a probe that does not answer in time makes it not ready."""
from __future__ import annotations

import asyncio

from cluster.front import ReplicaBoard
from cluster.links import ReplicaGone


class ScriptedStatus:
    """A replica link reduced to its status answer, which the test sets (the board calls nothing else)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.answer: dict | Exception = {"ready": True, "sessions": 0, "max_sessions": 1}
        self.delay_s = 0.0

    async def status(self) -> dict:
        await asyncio.sleep(self.delay_s)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def test_a_replica_found_gone_is_not_ready_until_a_later_probe_answers():
    link = ScriptedStatus("avatar_0")
    board = ReplicaBoard([link])
    await board.probe(link)
    assert board.ready("avatar_0")

    assert board.mark_gone("avatar_0", "its process died") is True
    assert not board.ready("avatar_0")
    assert board.mark_gone("avatar_0", "another page noticed") is False, "one failure, reported once"

    # a probe that started before the failure and answers after it must not make the replica ready again
    link.delay_s = 0.2
    slow_probe = asyncio.create_task(board.probe(link))
    await asyncio.sleep(0.05)
    board.mark_gone("avatar_0", "its process died")
    await slow_probe
    assert not board.ready("avatar_0")

    link.delay_s = 0.0
    await board.probe(link)
    assert board.ready("avatar_0")
    assert board.report("avatar_0")["ready"] is True


async def test_a_replica_that_fails_its_probe_or_says_not_ready_is_not_ready():
    link = ScriptedStatus("avatar_0")
    board = ReplicaBoard([link])
    link.answer = ReplicaGone("restarting")
    await board.probe(link)
    assert not board.ready("avatar_0") and "restarting" in board.report("avatar_0")["error"]
    link.answer = {"ready": False, "status": "loading"}
    await board.probe(link)
    assert not board.ready("avatar_0")
    link.answer = {"ready": True}
    await board.probe(link)
    assert board.ready("avatar_0")
