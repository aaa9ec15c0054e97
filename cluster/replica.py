"""`AvatarReplica`: one GPU group's server without its own HTTP face, driven by the front.

It is the single server's code, unchanged: the engine (`server.engine.ModelEngine`), the shared state and
metrics of `server.app.build_app`, and for each page a `server.signaling.WebSocketConnection` whose
websocket is a `RelaySocket`. The front hands it the page's messages (`deliver`) and collects what it
would have sent (`poll`, a long poll). The peer connections live here, in this process's event loop, so
the answer SDP carries this host's ICE candidates and media flows straight between the browser and
this host; only signaling passes through the front.

Plain Python: Ray Serve runs it as a deployment (cluster/serve_app.py), and the front can also hold one
in-process (`run_server.py cluster --address none`, the tests).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from model.config import AppConfig
from server.app import build_app, default_reference
from server.client_caps import CapExceeded
from server.engine import ModelEngine
from server.health import health_report
from server.seam import EngineBusy
from server.signaling import (
    STATE_KEY,
    RequestError,
    ServerState,
    WebSocketConnection,
    error_message,
    open_session,
    parse_offer,
)

log = logging.getLogger(__name__)

RELAY_SECRET_HEADER = "X-Liveavatar-Relay"  # proves a request to a replica's API port came through the front
RELAY_CLIENT_HEADER = "X-Liveavatar-Client"  # the address the front got it from (per-client caps count it)
LEASE_S = 20.0  # a relayed connection the front has not polled for this long is closed (the front went away)
REAPER_INTERVAL_S = 2.0
MAX_OUTBOX = 256  # messages kept for a front that polls late; the oldest stats go first


def replica_config(cfg: AppConfig) -> AppConfig:
    """The replica's own settings: offers never wait in line here (the front keeps the one line), and no replica
    takes over its machine's virtual camera (that is a single server's job)."""
    server = dataclasses.replace(cfg.server, max_queued=0)
    if getattr(server, "virtualcam", False):
        server = dataclasses.replace(server, virtualcam=False)
    return dataclasses.replace(cfg, server=server)


class RelaySocket:
    """Stands in for the page's websocket: what the connection sends waits here until the front polls."""

    def __init__(self) -> None:
        self.outbox: deque[dict[str, Any]] = deque(maxlen=MAX_OUTBOX)
        self.arrived = asyncio.Event()
        self.closed = False

    async def send_json(self, message: dict[str, Any]) -> None:
        self.outbox.append(message)
        self.arrived.set()

    def take(self) -> list[dict[str, Any]]:
        messages = list(self.outbox)
        self.outbox.clear()
        self.arrived.clear()
        return messages


class _Unlimited:
    """The front already applied the page's size and rate limits; a second bucket here would refuse bursts
    that the relay itself bunched together."""

    refused = 0

    @staticmethod
    def check(text: str) -> None:
        return None


@dataclass
class _Relayed:
    connection: WebSocketConnection
    socket: RelaySocket
    polled_s: float = field(default_factory=time.monotonic)


class AvatarReplica:
    """The engine plus the sessions of the pages the front placed here."""

    def __init__(self, cfg: AppConfig, ranks: int = 1, api_host: str = "127.0.0.1",
                 relay_secret: str | None = None) -> None:
        self.cfg = replica_config(cfg)
        self.ranks = ranks  # processes of its GPU group (one per GPU); 1: this process alone
        self.api_host = api_host  # where the single server's HTTP routes (the sessions API) listen for the front
        self.relay_secret = relay_secret
        self.api_url: str | None = None
        self._api_runner: web.AppRunner | None = None
        self.group: Any = None  # cluster.group.ReplicaGroup when ranks > 1
        self.engine: ModelEngine | None = None
        self.state: ServerState | None = None
        self._relayed: dict[str, _Relayed] = {}
        self._reaper: asyncio.Task | None = None
        self.started_s = time.time()

    async def start(self) -> None:
        """Start its GPU group (if any) and load the model; the replica takes sessions once this returns."""
        if self.ranks > 1:
            from cluster.group import ReplicaGroup

            self.group = ReplicaGroup(self.cfg, self.ranks)
            await self.group.start()
        self.engine = ModelEngine(self.cfg)
        await self.engine.load()
        # build_app wires metrics and worker-loss notices exactly as the single server does; its routes are
        # never served here (the front is the HTTP face)
        app = build_app(self.cfg, self.engine, default_reference(self.cfg))
        self.state = app[STATE_KEY]
        await self._serve_api(app)
        self._reaper = asyncio.get_running_loop().create_task(self._reap_abandoned(), name="relay-reaper")
        log.info("avatar replica ready (pid %d, host %s, %d rank(s), %d session slots)", os.getpid(),
                 socket.gethostname(), self.ranks, self.engine.max_sessions)

    async def _serve_api(self, app: web.Application) -> None:
        """The single server's own routes on an inner port, for the front to forward the sessions API to (speech,
        WHEP, WHIP, recordings: their handlers need the session's process). Token and limits apply as there."""
        app.middlewares.insert(0, relayed_client_middleware(self.relay_secret))
        self._api_runner = web.AppRunner(app, access_log=None)
        await self._api_runner.setup()
        await web.TCPSite(self._api_runner, self.api_host, 0).start()
        self.api_url = f"http://{self.api_host}:{self._api_runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._api_runner is not None:
            await self._api_runner.cleanup()  # its on_shutdown closes the sessions, as the single server's does
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for connection_id in list(self._relayed):
            await self.close_connection(connection_id)
        if self.state is not None:
            await self.state.close_all()
        if self.engine is not None:
            await self.engine.close()
        if self.group is not None:
            await self.group.close()

    # ------------------------------------------------------------------ what the front asks

    def status(self) -> dict[str, Any]:
        """Readiness and load for placement, with the same details as the single server's /healthz."""
        if self.state is None:
            return {"ready": False, "status": "loading", "pid": os.getpid(), "host": socket.gethostname()}
        healthy, report = health_report(self.state)
        fmt = self.engine.stream_format
        return {**report, "ready": healthy, "pid": os.getpid(), "host": socket.gethostname(),
                "relayed_connections": len(self._relayed), "started_unix_s": self.started_s,
                "fps": fmt.fps, "frames_per_clip": fmt.frames_per_clip, "ranks": self.ranks, "api_url": self.api_url}

    def metrics_text(self) -> str:
        """This replica's Prometheus text (the single server's series); the front adds the replica label."""
        if self.state is None:
            return ""
        return self.state.metrics.render()[0].decode()

    def open_connection(self, client: str) -> str:
        """A page's connection, before any message; returns its id for deliver/poll/close."""
        state = self._ready_state()
        relay = RelaySocket()
        connection = WebSocketConnection(relay, state, client)  # type: ignore[arg-type]  # the ws it needs
        connection.limits = _Unlimited()  # type: ignore[assignment]
        connection_id = uuid.uuid4().hex[:16]
        self._relayed[connection_id] = _Relayed(connection, relay)
        connection.gone = lambda: relay.closed or connection_id not in self._relayed
        return connection_id

    def has_room(self) -> bool:
        """A new session would be admitted now (model up, a slot free)."""
        if self.state is None or self.engine is None:
            return False
        healthy, _ = health_report(self.state)
        return healthy and self.engine.active_sessions < self.engine.max_sessions

    async def offer(self, connection_id: str, text: str) -> dict[str, Any]:
        """A page's offer, if a slot is free: `{"accepted": False}` leaves the connection untouched (the front
        tries another replica); otherwise the answer or the refusal waits in the outbox."""
        relayed = self._relayed_or_none(connection_id)
        if relayed is None:
            return {"accepted": False, "open": False}
        if not self.has_room():  # checked and taken without a pause in between (see engine.start)
            return {"accepted": False, "open": True}
        relayed.polled_s = time.monotonic()
        await relayed.connection.handle_text(text)
        return {"accepted": True, "open": True, "session": relayed.connection.session is not None}

    async def deliver(self, connection_id: str, text: str) -> dict[str, Any]:
        """Any other message of the page (set, stop, malformed ones): handled as the single server would."""
        relayed = self._relayed_or_none(connection_id)
        if relayed is None:
            return {"open": False}
        relayed.polled_s = time.monotonic()
        await relayed.connection.handle_text(text)
        return {"open": True, "session": relayed.connection.session is not None}

    async def poll(self, connection_id: str, wait_s: float) -> dict[str, Any]:
        """Messages for the page; waits up to `wait_s` for the first. `open: False` means this replica does not
        know the connection (it was restarted, or closed it)."""
        relayed = self._relayed_or_none(connection_id)
        if relayed is None:
            return {"open": False, "messages": [], "session": False}
        relayed.polled_s = time.monotonic()
        if not relayed.socket.outbox:
            try:
                await asyncio.wait_for(relayed.socket.arrived.wait(), timeout=wait_s)
            except TimeoutError:
                pass
        relayed.polled_s = time.monotonic()
        return {"open": True, "messages": relayed.socket.take(), "session": relayed.connection.session is not None}

    async def close_connection(self, connection_id: str) -> None:
        """The page left: end its session (if any) and forget the connection."""
        relayed = self._relayed.pop(connection_id, None)
        if relayed is None:
            return
        relayed.socket.closed = True
        await relayed.connection.close_session()

    async def http_offer(self, payload: Any, client: str) -> tuple[int, dict[str, Any]]:
        """`POST /offer` relayed by the front (body already parsed as JSON): (status, body) as the single server."""
        state = self._ready_state()
        try:
            if not isinstance(payload, dict):
                raise RequestError("bad_message", "body must be a JSON object {sdp, type}")
            sdp_type = payload.get("type", "offer")
            if sdp_type != "offer":
                raise RequestError("bad_offer", f"expected an SDP of type 'offer', got {sdp_type!r}")
            sdp, reference, prompt, steps = parse_offer(payload, state)
            if not self.has_room():
                raise RequestError("busy", "this replica's session slots are all in use")
            try:
                with state.caps.hold("offer", client):
                    session, answer = await open_session(state, sdp, sdp_type, reference, prompt, steps)
            except CapExceeded as exc:
                raise RequestError(exc.code, str(exc)) from None
        except RequestError as exc:
            state.metrics.error(exc.code)
            status = {"busy": 503, CapExceeded.code: 429}.get(exc.code, 400)
            return status, error_message(exc.code, str(exc))
        except EngineBusy as exc:
            state.metrics.error("busy")
            return 503, error_message("busy", str(exc))
        return 200, {"sdp": answer.sdp, "type": answer.type, "session_id": session.session_id}

    # ------------------------------------------------------------------ internals

    def _ready_state(self) -> ServerState:
        if self.state is None:
            raise RuntimeError("the replica's model is still loading")
        return self.state

    def _relayed_or_none(self, connection_id: str) -> _Relayed | None:
        return self._relayed.get(connection_id)

    async def _reap_abandoned(self) -> None:
        """Close connections whose front stopped polling (it died or lost us): their slots must not leak."""
        while True:
            await asyncio.sleep(REAPER_INTERVAL_S)
            now = time.monotonic()
            for connection_id, relayed in list(self._relayed.items()):
                if now - relayed.polled_s > LEASE_S:
                    log.info("closing relayed connection %s: the front has not polled it for %.0f s",
                             connection_id, now - relayed.polled_s)
                    await self.close_connection(connection_id)


def relayed_client_middleware(secret: str | None) -> Any:
    """Requests the front forwarded carry the page's address; without the front's secret the header is ignored."""

    @web.middleware
    async def take_client(request: web.Request, handler: Any) -> web.StreamResponse:
        client = request.headers.get(RELAY_CLIENT_HEADER)
        presented = request.headers.get(RELAY_SECRET_HEADER, "")
        if client and secret and hmac.compare_digest(presented.encode(), secret.encode()):
            request = request.clone(remote=client)
        return await handler(request)

    return take_client


def message_type(text: str) -> str | None:
    """The `type` of a page's message, or None when it is not a JSON object with one (the replica then says
    what is wrong, as the single server does)."""
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    if isinstance(message, dict) and isinstance(message.get("type"), str):
        return message["type"]
    return None
