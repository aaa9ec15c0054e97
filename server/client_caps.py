"""Caps on what one client address may hold at once: open websockets, offers in progress, WHEP viewers.

Rate limits (server/limits.py) bound how fast a client asks; these bound how much it keeps: without them
one address could open thousands of idle websockets (each costing memory) or pile up offers. A refusal
names the limit and its flag; the count drops as soon as the connection, offer or viewer ends.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from model.config import AppConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Cap:
    flag: str
    noun: str  # what is counted, in a refusal


CAPS = {
    "websocket": _Cap("max_connections_per_client", "open websockets"),
    "offer": _Cap("max_pending_offers_per_client", "offers being answered or waiting in line"),
    "viewer": _Cap("max_viewers_per_client", "WHEP viewers"),
}


class CapExceeded(RuntimeError):
    """A client already holds as many of something as it may; the message names the flag."""

    code = "too_many_connections"


class ClientCaps:
    """Counts per (kind, address); `hold` takes one place for the life of a `with` block."""

    def __init__(self, cfg: AppConfig) -> None:
        self._limits = {kind: getattr(cfg.server, cap.flag) for kind, cap in CAPS.items()}
        self._held: Counter[tuple[str, str]] = Counter()

    def held(self, kind: str, client: str) -> int:
        return self._held[(kind, client)]

    def acquire(self, kind: str, client: str) -> None:
        """Take a place or raise CapExceeded (logged once, as the operator's line for the refusal)."""
        limit = self._limits[kind]
        key = (kind, client)
        if self._held[key] >= limit:
            cap = CAPS[kind]
            log.warning("refused %s from %s: it holds %d (--server.%s)", kind, client, limit, cap.flag)
            raise CapExceeded(f"this address already holds {limit} {cap.noun}; the limit is {limit} per client "
                              f"(--server.{cap.flag}): close one first")
        self._held[key] += 1

    def release(self, kind: str, client: str) -> None:
        key = (kind, client)
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]  # forgotten addresses cost nothing

    @contextmanager
    def hold(self, kind: str, client: str) -> Iterator[None]:
        self.acquire(kind, client)
        try:
            yield
        finally:
            self.release(kind, client)


def client_address(remote: str | None) -> str:
    """The key a request is counted under (aiohttp's `request.remote`)."""
    return remote or "unknown"


async def close_when_idle(is_idle: Callable[[], bool], close: Callable[[], object], timeout_s: float,
                          poll_s: float = 0.5) -> None:
    """Call `close()` once `is_idle()` has held for `timeout_s` without a break (a task per websocket)."""
    idle_since: float | None = None
    while True:
        await asyncio.sleep(min(poll_s, timeout_s))
        now = time.monotonic()
        if not is_idle():
            idle_since = None
            continue
        idle_since = now if idle_since is None else idle_since
        if now - idle_since >= timeout_s:
            result = close()
            if asyncio.iscoroutine(result):
                await result
            return
