"""The sessions API at the front (`/sessions...`, WHEP, `/whip`): new sessions placed like a page's offer,
everything about one session forwarded to the replica that holds it.

Each replica serves the single server's own routes on an inner port (`AvatarReplica.api_url`); the front
forwards the request there unchanged (with the caller's token, and the caller's address for the per-client
caps), so speech, WHEP viewers, WHIP and recordings behave exactly as on one server. WHEP and WHIP answers carry
the replica host's ICE candidates: media goes straight there, as for pages.

Which replica holds a session is learnt when the front creates it (API, WHIP, a page's offer); an id it has
not seen (the front restarted) is looked up on every ready replica once.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from cluster.placement import placement_order
from cluster.replica import RELAY_CLIENT_HEADER, RELAY_SECRET_HEADER
from server.client_caps import client_address
from server.signaling import error_message

if TYPE_CHECKING:
    from cluster.front import FrontServer

log = logging.getLogger(__name__)

MAX_REMEMBERED = 100_000  # session ids -> replica, oldest forgotten first
FORWARD_TIMEOUT_S = 120.0  # a speak request decodes (or synthesises) its whole speech first
KEPT_REQUEST_HEADERS = ("Authorization", "Content-Type", "Accept", "Origin")
KEPT_RESPONSE_HEADERS = ("Content-Type", "Location", "Content-Disposition", "Cache-Control", "ETag")


class ApiRelay:
    """Routes of the sessions API on the front, and the session -> replica map they keep."""

    def __init__(self, front: FrontServer, relay_secret: str | None) -> None:
        self._front = front
        self._secret = relay_secret
        self._owner: OrderedDict[str, str] = OrderedDict()
        self._http: aiohttp.ClientSession | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/sessions", self.create_handler)
        app.router.add_get("/sessions", self.list_handler)
        app.router.add_route("*", "/sessions/{id}", self.session_handler)
        app.router.add_route("*", "/sessions/{id}/{rest:.*}", self.session_handler)
        app.router.add_post("/whip", self.create_handler)
        app.router.add_route("*", "/whip/{id}", self.session_handler)
        app.on_cleanup.append(self._close)

    def remember(self, session_id: str, replica: str) -> None:
        """`session_id` lives on `replica` (a page's answer, an API or WHIP session the front created)."""
        self._owner[session_id] = replica
        self._owner.move_to_end(session_id)
        while len(self._owner) > MAX_REMEMBERED:
            self._owner.popitem(last=False)

    # ------------------------------------------------------------------ handlers

    async def create_handler(self, request: web.Request) -> web.StreamResponse:
        """`POST /sessions`, `POST /whip`: the least-loaded ready replica with a free slot takes it."""
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        tried: set[str] = set()
        while True:
            order = placement_order(self._front.loads(), exclude=tried)
            if not order:
                error = self._front.busy_error()
                self._front.metrics.error(error.code)
                return web.json_response(error_message(error.code, str(error)), status=503)
            name = order[0]
            tried.add(name)
            self._front.http_offers[name] += 1  # counts toward its load while it answers
            try:
                response, payload = await self._forward(name, request, body)
            finally:
                self._front.http_offers[name] -= 1
            if response is None or response.status == 503:
                continue  # gone, or full since its last report: the next one
            session_id = _created_id(response, payload)
            if session_id:
                self.remember(session_id, name)
                self._front.metrics.placed.labels(replica=name).inc()
            return response

    async def list_handler(self, request: web.Request) -> web.Response:
        """`GET /sessions`: every ready replica's sessions, each marked with its replica."""
        names = [load.name for load in self._front.loads() if load.ready]
        answers = await asyncio.gather(*(self._forward(name, request, b"", quiet=True) for name in names))
        sessions: list[dict[str, Any]] = []
        for name, (response, payload) in zip(names, answers, strict=True):
            if response is None or response.status != 200 or not isinstance(payload, dict):
                if response is not None and response.status in (401, 403):
                    return response  # the token is wrong: say so, as one server would
                continue
            for session in payload.get("sessions", []):
                sessions.append({**session, "replica": name})
                if isinstance(session, dict) and session.get("id"):
                    self.remember(session["id"], name)
        return web.json_response({"sessions": sessions})

    async def session_handler(self, request: web.Request) -> web.StreamResponse:
        """Anything about one session: forwarded to the replica that holds it."""
        session_id = request.match_info["id"]
        name = self._owner.get(session_id) or await self._find(request, session_id)
        if name is None:
            self._front.metrics.error("unknown_session")
            return web.json_response(error_message("unknown_session", f"no live session {session_id!r} on any "
                                                                      "replica"), status=404)
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        response, _ = await self._forward(name, request, body)
        if response is None:
            self._front.metrics.error("worker_failed")
            return web.json_response(error_message("worker_failed", f"the avatar replica {name} holding session "
                                                                    f"{session_id} does not answer; start again"),
                                     status=502)
        return response

    # ------------------------------------------------------------------ internals

    async def _find(self, request: web.Request, session_id: str) -> str | None:
        names = [load.name for load in self._front.loads() if load.ready]
        probe = request.clone(method="GET", rel_url=f"/sessions/{session_id}")
        answers = await asyncio.gather(*(self._forward(name, probe, b"", quiet=True) for name in names))
        for name, (response, _) in zip(names, answers, strict=True):
            if response is not None and response.status == 200:
                self.remember(session_id, name)
                return name
        return None

    async def _body(self, request: web.Request) -> bytes | web.Response:
        """The request body, up to the largest the API takes (a speech file), read past the front's own limit."""
        limit = max(self._front.cfg.server.max_message_bytes, getattr(self._front.cfg.server, "max_audio_bytes", 0))
        if request.content_length is not None and request.content_length > limit:
            return self._refuse_size(request.content_length, limit)
        chunks, size = [], 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                return self._refuse_size(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def _refuse_size(self, size: int, limit: int) -> web.Response:
        self._front.metrics.error("too_large")
        return web.json_response(error_message("too_large", f"request is {size} bytes or more; the limit is {limit}"),
                                 status=413)

    async def _forward(self, name: str, request: web.Request, body: bytes,
                       quiet: bool = False) -> tuple[web.Response | None, Any]:
        """(the replica's answer as the front's response, its JSON body if any); None when it does not answer (then,
        unless `quiet`, the replica is marked gone, as when a page's relay finds it so)."""
        status = self._front.board.status(name) or {}
        base = status.get("api_url")
        if not base:
            return None, None
        headers = {key: request.headers[key] for key in KEPT_REQUEST_HEADERS if key in request.headers}
        headers[RELAY_CLIENT_HEADER] = client_address(request.remote)
        if self._secret:
            headers[RELAY_SECRET_HEADER] = self._secret
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S))
        try:
            async with self._http.request(request.method, base + request.rel_url.path_qs, headers=headers,
                                          data=body or None, allow_redirects=False) as answer:
                content = await answer.read()
                kept = {key: answer.headers[key] for key in KEPT_RESPONSE_HEADERS if key in answer.headers}
                payload = None
                if answer.content_type == "application/json":
                    try:
                        payload = await answer.json()
                    except ValueError:
                        payload = None
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("forwarding %s %s to replica %s failed: %s", request.method, request.path, name, exc)
            if not quiet:
                self._front.replica_lost(name, f"its API did not answer ({type(exc).__name__})")
            return None, None
        return web.Response(body=content, status=answer.status, headers=kept), payload

    async def _close(self, app: web.Application) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


def _created_id(response: web.Response, payload: Any) -> str | None:
    """The new session's id: the JSON `id` of `POST /sessions`, the `Location` of `POST /whip`."""
    if response.status not in (200, 201):
        return None
    if isinstance(payload, dict) and isinstance(payload.get("id"), str):
        return payload["id"]
    location = response.headers.get("Location", "")
    return location.rstrip("/").rsplit("/", 1)[-1] or None
