"""The waiting line for sessions: with `server.max_queued > 0`, offers beyond the session limit wait in
order and are told their place; without it (the default) they are refused at once with `busy`."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from server.seam import EngineBusy

POLL_S = 0.1


class AdmissionQueue:
    """First come, first served: only the head of the line may start a session, one at a time."""

    def __init__(self, max_sessions: int, max_queued: int) -> None:
        self.max_sessions = max_sessions
        self.max_queued = max_queued
        self._line: list[object] = []
        self._admitting: object | None = None  # the head, while its session is being opened

    @property
    def waiting(self) -> int:
        return len(self._line) - (self._admitting is not None)

    @asynccontextmanager
    async def turn(self, has_room: Callable[[], bool], tell_position: Callable[[int], Awaitable[None]],
                   gone: Callable[[], bool] = lambda: False) -> AsyncIterator[None]:
        """Hold the caller's place until it may open its session (inside the block); EngineBusy if the line
        is full or the caller's connection closed while it waited."""
        if self.max_queued <= 0:
            yield  # no line: the engine admits or refuses by itself
            return
        if (self._line or not has_room()) and self.waiting >= self.max_queued:
            raise EngineBusy(f"server busy: all {self.max_sessions} session slots are in use and the waiting "
                             f"line is full ({self.max_queued}); try again later")
        ticket = object()
        self._line.append(ticket)
        try:
            told = None
            while not (self._line[0] is ticket and has_room()):
                if gone():
                    raise EngineBusy("left the waiting line (the connection closed)")
                position = self._line.index(ticket) + 1 - (self._admitting is not None)
                if position != told:
                    told = position
                    await tell_position(position)
                await asyncio.sleep(POLL_S)
            self._admitting = ticket
            yield
        finally:
            if self._admitting is ticket:
                self._admitting = None
            self._line.remove(ticket)
