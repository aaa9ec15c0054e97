"""How the front reaches a replica: `ReplicaLink`, with an in-process implementation (no Ray).

The Ray Serve implementation (`cluster.serve_app.ServeLink`) calls the same `AvatarReplica` methods
through a deployment handle. Every failure to reach a replica (its process died, Serve is restarting it,
a call timed out) surfaces as `ReplicaGone`, whatever carried the call.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from cluster.replica import AvatarReplica

T = TypeVar("T")

STATUS_TIMEOUT_S = 3.0
CONTROL_TIMEOUT_S = 10.0  # open/close/deliver of a message that starts no session
OFFER_TIMEOUT_S = 120.0  # an offer prepares the avatar (the 14B preset encodes the prompt on the CPU)
POLL_SLACK_S = 10.0  # a long poll may take this much longer than it was asked to wait


class ReplicaGone(RuntimeError):
    """The replica did not answer: it died, is being restarted, or the call timed out; the message says which."""


class ReplicaLink(Protocol):
    """The front's view of one replica (the `AvatarReplica` methods, awaited, raising ReplicaGone)."""

    name: str

    async def status(self) -> dict[str, Any]: ...

    async def metrics_text(self) -> str: ...

    async def open_connection(self, client: str) -> str: ...

    async def offer(self, connection_id: str, text: str) -> dict[str, Any]: ...

    async def deliver(self, connection_id: str, text: str) -> dict[str, Any]: ...

    async def poll(self, connection_id: str, wait_s: float) -> dict[str, Any]: ...

    async def close_connection(self, connection_id: str) -> None: ...

    async def http_offer(self, payload: Any, client: str) -> tuple[int, dict[str, Any]]: ...


async def within(awaitable: Awaitable[T], timeout_s: float, what: str, replica: str) -> T:
    """Await a replica call, turning a timeout into ReplicaGone."""
    try:
        return await asyncio.wait_for(awaitable, timeout=timeout_s)
    except TimeoutError:
        raise ReplicaGone(f"replica {replica} did not answer {what} within {timeout_s:g} s") from None


class InProcessLink:
    """A replica living in the front's own process and event loop (one GPU group, no Ray)."""

    def __init__(self, name: str, replica: AvatarReplica) -> None:
        self.name = name
        self.replica = replica

    async def status(self) -> dict[str, Any]:
        return self.replica.status()

    async def metrics_text(self) -> str:
        return self.replica.metrics_text()

    async def open_connection(self, client: str) -> str:
        return self.replica.open_connection(client)

    async def offer(self, connection_id: str, text: str) -> dict[str, Any]:
        return await within(self.replica.offer(connection_id, text), OFFER_TIMEOUT_S, "an offer", self.name)

    async def deliver(self, connection_id: str, text: str) -> dict[str, Any]:
        return await within(self.replica.deliver(connection_id, text), CONTROL_TIMEOUT_S, "a message", self.name)

    async def poll(self, connection_id: str, wait_s: float) -> dict[str, Any]:
        return await self.replica.poll(connection_id, wait_s)

    async def close_connection(self, connection_id: str) -> None:
        await self.replica.close_connection(connection_id)

    async def http_offer(self, payload: Any, client: str) -> tuple[int, dict[str, Any]]:
        return await within(self.replica.http_offer(payload, client), OFFER_TIMEOUT_S, "an offer", self.name)
