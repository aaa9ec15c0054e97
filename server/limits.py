"""Limits on what one client may send: message size and message rate, on the websocket and over HTTP.

A refused message is answered with an error saying which limit it broke and by how much; the
connection stays open, so a page that sent one bad message keeps its session.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aiohttp import web

from model.config import AppConfig

HARD_SIZE_FACTOR = 4  # frames beyond this many times the limit close the websocket (never read into memory)
MAX_TRACKED_CLIENTS = 4096  # remote addresses remembered by the HTTP rate limiter (oldest forgotten first)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TokenBucket:
    """`rate_per_s` messages per second on average, bursts up to `burst`; `allow()` spends one token."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last_s = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last_s) * self.rate_per_s)
        self._last_s = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class MessageLimits:
    """One websocket's limits: `check(text)` returns None, or (code, message) for a refused message."""

    def __init__(self, max_message_bytes: int, max_messages_per_s: float) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_messages_per_s = max_messages_per_s
        # a burst of a second's worth lets a page send its offer and a few controls at once
        self._bucket = TokenBucket(max_messages_per_s, burst=max(1.0, max_messages_per_s))
        self.refused = 0

    def check(self, text: str) -> tuple[str, str] | None:
        size = len(text.encode("utf-8", errors="surrogatepass"))
        if size > self.max_message_bytes:
            self.refused += 1
            return ("too_large", (f"message is {size} bytes; the limit is {self.max_message_bytes} bytes "
                                 "(--server.max_message_bytes); send a smaller reference image"))
        if not self._bucket.allow():
            self.refused += 1
            return ("rate_limited", (f"too many messages: the limit is {self.max_messages_per_s:g} per second "
                                    "(--server.max_messages_per_s); this one was dropped, slow down"))
        return None


def hard_message_limit(cfg: AppConfig) -> int:
    """aiohttp's own websocket frame limit: far above ours, so we can answer oversize messages politely."""
    return cfg.server.max_message_bytes * HARD_SIZE_FACTOR


class ClientRateLimiter:
    """Per-remote-address token buckets for plain HTTP requests (`POST /offer`), with bounded memory."""

    def __init__(self, rate_per_s: float, max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        self.rate_per_s = rate_per_s
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, client: str) -> bool:
        bucket = self._buckets.pop(client, None) or TokenBucket(self.rate_per_s, burst=max(1.0, self.rate_per_s))
        self._buckets[client] = bucket
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return bucket.allow()


def limits_middleware(cfg: AppConfig, on_refused: Callable[[str], None] | None = None) -> web.middleware:
    """Rate-limit `POST /offer` per client and turn aiohttp's bare 413 into a JSON error naming the limit."""
    limiter = ClientRateLimiter(cfg.server.max_messages_per_s)
    max_bytes = cfg.server.max_message_bytes

    def refuse(status: int, code: str, message: str) -> web.Response:
        if on_refused is not None:
            on_refused(code)
        return web.json_response({"type": "error", "code": code, "message": message}, status=status)

    @web.middleware
    async def check_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and not limiter.allow(request.remote or "unknown"):
            return refuse(429, "rate_limited", f"too many requests: the limit is {cfg.server.max_messages_per_s:g} "
                                               "per second per client (--server.max_messages_per_s)")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return refuse(413, "too_large", f"request body is larger than {max_bytes} bytes "
                                            "(--server.max_message_bytes)")

    return check_limits
