"""The cluster's one address: the page, `/ws`, `POST /offer`, the sessions API (cluster/api_relay.py),
`/config.json`, `/healthz` and `/metrics`.

The front holds no model and no media. For each page it picks a replica (cluster/placement.py), relays
the page's messages to that replica's `WebSocketConnection` and the replica's messages back; the answer
SDP it relays names the replica's host, so the browser's media goes straight there. It is the same aiohttp
face as the single server (its token, origin, size, rate and per-client checks are reused as they are).

When a replica stops answering (its process died; Serve restarts it) its pages get `worker_failed` then
`connection_lost`, as when the single server's worker dies: the page starts again and is placed on a replica
that is up. A replica is offered sessions only while its last status probe, newer than its last failure,
says it is ready.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from cluster.api_relay import ApiRelay
from cluster.links import CONTROL_TIMEOUT_S, STATUS_TIMEOUT_S, ReplicaGone, ReplicaLink, within
from cluster.metrics_merge import FrontMetrics, render_cluster_metrics
from cluster.placement import ReplicaLoad, capacity, pick_any_ready, placement_order
from cluster.replica import message_type
from model.config import AppConfig
from server.access import access_middleware, presented_token, resolve_token, token_matches
from server.admission import AdmissionQueue
from server.app import CLIENT_DIR, index_handler
from server.client_caps import CapExceeded, ClientCaps, client_address, close_when_idle
from server.ice import browser_ice_servers
from server.limits import MessageLimits, hard_message_limit, limits_middleware
from server.seam import EngineBusy
from server.signaling import RequestError, error_message, json_body, refusal

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 0.5  # how often each replica is probed
STATUS_STALE_S = 5.0  # a probe older than this no longer makes a replica ready
POLL_WAIT_S = 5.0  # a long poll returns at the first message, or after this


@dataclass
class _Seen:
    status: dict[str, Any] | None = None
    probed_s: float = -math.inf  # when the probe behind `status` started (monotonic)
    gone_s: float = -math.inf  # when a call last found the replica gone
    error: str | None = None


class ReplicaBoard:
    """The last status of every replica, probed in the background; a replica found gone is not ready until a
    probe started after that answers."""

    def __init__(self, links: Sequence[ReplicaLink], interval_s: float = STATUS_INTERVAL_S) -> None:
        self._links = list(links)
        self._seen = {link.name: _Seen() for link in links}
        self._interval_s = interval_s
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._probe_forever(link), name=f"probe-{link.name}") for link in self._links]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def probe(self, link: ReplicaLink) -> None:
        seen = self._seen[link.name]
        started_s = time.monotonic()
        try:
            status = await within(link.status(), STATUS_TIMEOUT_S, "its status probe", link.name)
        except ReplicaGone as exc:
            seen.status, seen.error = None, str(exc)
            return
        except Exception as exc:  # noqa: BLE001 - whatever broke the probe, the replica is not ready
            seen.status, seen.error = None, f"status probe failed ({type(exc).__name__}: {exc})"
            return
        if started_s > seen.gone_s:
            seen.status, seen.probed_s, seen.error = status, started_s, None

    async def _probe_forever(self, link: ReplicaLink) -> None:
        was_ready: bool | None = None
        while True:
            await self.probe(link)
            ready = self.ready(link.name)
            if ready != was_ready:
                seen = self._seen[link.name]
                log.info("replica %s is %s", link.name, "ready" if ready else f"not ready ({seen.error or 'loading'})")
                was_ready = ready
            await asyncio.sleep(self._interval_s)

    def mark_gone(self, name: str, reason: str) -> bool:
        """Not ready until a probe started after now answers; True if this is news (not already marked since
        the last good probe: every page of a dead replica reports it)."""
        seen = self._seen[name]
        news = seen.gone_s < seen.probed_s
        seen.gone_s, seen.status, seen.error = time.monotonic(), None, reason
        return news

    def ready(self, name: str) -> bool:
        seen = self._seen[name]
        return bool(seen.status and seen.status.get("ready")) and time.monotonic() - seen.probed_s < STATUS_STALE_S

    def status(self, name: str) -> dict[str, Any] | None:
        return self._seen[name].status

    def report(self, name: str) -> dict[str, Any]:
        seen = self._seen[name]
        return {"ready": self.ready(name), **(seen.status or {}), **({"error": seen.error} if seen.error else {})}


class FrontServer:
    """Placement, the waiting line and the page relays over a fixed set of replicas."""

    def __init__(self, cfg: AppConfig, links: Sequence[ReplicaLink], relay_secret: str | None = None) -> None:
        """`relay_secret`: what the replicas' API ports trust the page addresses the front forwards by."""
        if not links:
            raise ValueError("a front needs at least one replica")
        self.cfg = cfg
        self.links = {link.name: link for link in links}
        self.board = ReplicaBoard(links)
        self.metrics = FrontMetrics(list(self.links))
        self.pages: set[PageRelay] = set()
        self.http_offers: dict[str, int] = {name: 0 for name in self.links}  # POST /offer being answered
        self.admission = AdmissionQueue(cfg.server.max_sessions * len(links), cfg.server.max_queued)
        self.caps = ClientCaps(cfg)
        self.api = ApiRelay(self, relay_secret)

    # ------------------------------------------------------------------ placement

    def loads(self) -> list[ReplicaLoad]:
        loads = []
        for name in self.links:
            status = self.board.status(name) or {}
            placed = self.http_offers[name] + sum(1 for page in self.pages if page.holds_slot_on(name))
            loads.append(ReplicaLoad(name=name, ready=self.board.ready(name), sessions=int(status.get("sessions", 0)),
                                     max_sessions=int(status.get("max_sessions", self.cfg.server.max_sessions)),
                                     placed=placed))
        return loads

    def has_room(self) -> bool:
        return bool(placement_order(self.loads()))

    def busy_error(self) -> RequestError:
        cap = capacity(self.loads())
        if cap.ready == 0:
            return RequestError("busy", f"no avatar replica is ready (0 of {cap.replicas}; they are starting or "
                                        "restarting); try again in a moment")
        return RequestError("busy", f"server busy: all {cap.slots} session slots on {cap.ready} replica(s) are in "
                                    "use; try again when someone leaves")

    def replica_lost(self, name: str, reason: str) -> None:
        if self.board.mark_gone(name, reason):
            log.warning("replica %s lost: %s", name, reason)
            self.metrics.replica_failures.labels(replica=name).inc()

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        self.board.start()
        await asyncio.gather(*(self.board.probe(link) for link in self.links.values()))

    async def close(self) -> None:
        await asyncio.gather(*(page.close() for page in list(self.pages)), return_exceptions=True)
        await self.board.stop()

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.server.max_message_bytes,
                              middlewares=[access_middleware(self.cfg, self.metrics.error),
                                           limits_middleware(self.cfg, self.metrics.error)])
        app.router.add_get("/", index_handler)
        app.router.add_static("/static/", CLIENT_DIR, follow_symlinks=False, show_index=False)
        app.router.add_get("/ws", self.websocket_handler)
        app.router.add_post("/offer", self.offer_handler)
        app.router.add_get("/config.json", self.page_config_handler)
        app.router.add_get("/healthz", self.healthz_handler)
        app.router.add_get("/metrics", self.metrics_handler)
        self.api.add_routes(app)

        async def close_pages(app: web.Application) -> None:
            await self.close()

        app.on_shutdown.append(close_pages)
        return app

    # ------------------------------------------------------------------ handlers

    async def websocket_handler(self, request: web.Request) -> web.WebSocketResponse:
        """`/ws`: the page's control channel, relayed to the replica that holds (or will hold) its session."""
        client = client_address(request.remote)
        try:
            self.caps.acquire("websocket", client)
        except CapExceeded as exc:
            self.metrics.error(exc.code)
            return web.json_response(error_message(exc.code, str(exc)), status=429)
        try:
            return await self._serve_websocket(request, client)
        finally:
            self.caps.release("websocket", client)

    async def _serve_websocket(self, request: web.Request, client: str) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=hard_message_limit(self.cfg), heartbeat=20.0)
        await ws.prepare(request)

        async def send(message: dict[str, Any]) -> None:
            if not ws.closed:
                try:
                    await ws.send_json(message)
                except (ConnectionError, RuntimeError):
                    pass  # the page went away; the read loop will notice

        page = PageRelay(self, send, client,
                         gone=lambda: ws.closed or request.transport is None or request.transport.is_closing())
        self.pages.add(page)
        timeout_s = self.cfg.server.offer_timeout_s

        async def close_idle() -> None:
            log.info("websocket from %s closed: no offer nor session for %g s", client, timeout_s)
            await page.refuse("offer_timeout", f"no offer arrived within {timeout_s:g} s "
                                               "(--server.offer_timeout_s); connect again to start")
            await ws.close()

        watcher = asyncio.create_task(close_when_idle(lambda: not page.holds_slot, close_idle, timeout_s))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await page.handle_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await page.refuse("bad_message", "binary messages are not accepted; send JSON text")
                elif msg.type == WSMsgType.ERROR:
                    log.info("websocket closed with error: %s", ws.exception())
                    break
        finally:
            watcher.cancel()
            await page.close()
            self.pages.discard(page)
        return ws

    async def offer_handler(self, request: web.Request) -> web.Response:
        """`POST /offer` `{sdp, type, config?}` -> `{sdp, type}` from the least-loaded replica with a free slot."""
        client = client_address(request.remote)
        try:
            payload = await json_body(request, self.cfg.server.max_message_bytes)
            try:
                with self.caps.hold("offer", client):
                    return await self._place_http_offer(payload, client)
            except CapExceeded as exc:
                raise RequestError(exc.code, str(exc)) from None
        except RequestError as exc:
            self.metrics.error(exc.code)
            return refusal(exc)

    async def _place_http_offer(self, payload: Any, client: str) -> web.Response:
        tried: set[str] = set()
        while True:
            order = placement_order(self.loads(), exclude=tried)
            if not order:
                raise self.busy_error()
            name = order[0]
            tried.add(name)
            self.http_offers[name] += 1
            try:
                status, body = await self.links[name].http_offer(payload, client)
            except ReplicaGone as exc:
                self.replica_lost(name, str(exc))
                continue  # it never answered: the offer is still good for another replica
            finally:
                self.http_offers[name] -= 1
            if status == 503:
                continue  # it filled up since its last report
            if status == 200:
                self.metrics.placed.labels(replica=name).inc()
                if body.get("session_id"):
                    self.api.remember(body["session_id"], name)
            return web.json_response(body, status=status)

    async def page_config_handler(self, request: web.Request) -> web.Response:
        return web.json_response({"iceServers": browser_ice_servers(self.cfg),
                                  "sample_steps": self.cfg.sampler.sample_steps},
                                 headers={"Cache-Control": "no-store"})

    def health(self) -> tuple[bool, dict[str, Any]]:
        cap = capacity(self.loads())
        report = {"status": "ok" if cap.ready else "unavailable", "replicas": cap.replicas,
                  "replicas_ready": cap.ready, "sessions": cap.used, "max_sessions": cap.slots,
                  "waiting": self.admission.waiting,
                  "replica_status": {name: self.board.report(name) for name in self.links}}
        return cap.ready > 0, report

    async def healthz_handler(self, request: web.Request) -> web.Response:
        """200 while at least one replica can take sessions, 503 otherwise. It stays open for load balancers, as on
        the single server; each replica's details (its host and pid among them) only with the token, if one is set."""
        healthy, report = self.health()
        token = resolve_token(self.cfg)
        if token is not None and not token_matches(token, presented_token(request)):
            report.pop("replica_status")
        return web.json_response(report, status=200 if healthy else 503)

    async def metrics_handler(self, request: web.Request) -> web.Response:
        """Prometheus text: the front's series, then every reachable replica's with a `replica` label."""
        names = list(self.links)

        async def scrape(name: str) -> str | None:
            try:
                return await within(self.links[name].metrics_text(), STATUS_TIMEOUT_S, "a metrics scrape", name)
            except Exception as exc:  # noqa: BLE001 - an unreachable replica shows as up 0, the scrape goes on
                log.info("metrics of replica %s left out: %s", name, exc)
                return None

        texts = dict(zip(names, await asyncio.gather(*(scrape(n) for n in names)), strict=True))
        self.metrics.update({n: self.board.ready(n) for n in names}, capacity(self.loads()), self.admission.waiting)
        response = web.Response(body=render_cluster_metrics(self.metrics, texts))
        response.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
        return response


SendFn = Callable[[dict[str, Any]], Awaitable[None]]


class PageRelay:
    """One page's websocket at the front: its replica connection, the pump of the replica's messages, and what
    the front must decide itself (placement, the line, a replica that vanished)."""

    def __init__(self, front: FrontServer, send: SendFn, client: str, gone: Callable[[], bool]) -> None:
        self._front = front
        self._send = send
        self.client = client
        self.gone = gone
        self.limits = MessageLimits(front.cfg.server.max_message_bytes, front.cfg.server.max_messages_per_s)
        self.link: ReplicaLink | None = None
        self.connection_id: str | None = None
        self.session_live = False
        self.offering = False  # an offer is being placed or waits in line
        self.placing_on: str | None = None  # the replica answering this page's offer right now
        self._pump: asyncio.Task | None = None

    @property
    def holds_slot(self) -> bool:
        return self.offering or self.session_live

    def holds_slot_on(self, name: str) -> bool:
        """Counts toward `name`'s load: its session lives there, or an offer is being answered there (not while
        the offer waits in line, whatever replica the page's connection last used)."""
        if self.placing_on == name:
            return True
        return self.session_live and self.link is not None and self.link.name == name

    async def refuse(self, code: str, message: str) -> None:
        """An error decided at the front (counted there; the replicas count their own)."""
        self._front.metrics.error(code)
        await self._send(error_message(code, message))

    async def handle_text(self, text: str) -> None:
        refused = self.limits.check(text)
        if refused is not None:
            await self.refuse(*refused)
            return
        try:
            if message_type(text) == "offer" and not self.session_live:
                await self._offer(text)
            else:
                await self._relay(text)
        except RequestError as exc:
            await self.refuse(exc.code, str(exc))

    # ------------------------------------------------------------------ offers: placement and the line

    async def _offer(self, text: str) -> None:
        front = self._front
        self.offering = True
        try:
            with front.caps.hold("offer", self.client):
                front.admission.max_sessions = max(1, capacity(front.loads()).slots)  # named in its refusal
                async with front.admission.turn(front.has_room, self._tell_position, self.gone):
                    await self._offer_somewhere(text)
        except EngineBusy as exc:  # the line is full, or this page left it
            raise RequestError("busy", str(exc)) from None
        except CapExceeded as exc:
            raise RequestError(exc.code, str(exc)) from None
        finally:
            self.offering = False

    async def _offer_somewhere(self, text: str) -> None:
        """Offer to the best replica; one that is full after all or that vanished is skipped for the next."""
        front = self._front
        tried: set[str] = set()
        while True:
            order = placement_order(front.loads(), exclude=tried)
            if not order:
                raise front.busy_error()
            name = order[0]
            tried.add(name)
            if self.link is not None and self.link.name != name:
                await self._detach()
            self.placing_on = name
            try:
                if self.link is None:
                    await self._attach(name)
                link, connection_id = self.link, self.connection_id
                result = await link.offer(connection_id, text)
            except ReplicaGone as exc:
                front.replica_lost(name, str(exc))
                await self._detach()
                continue  # it never answered: the page's offer is still good for another replica
            finally:
                self.placing_on = None
            if not result["accepted"]:
                if not result["open"]:
                    await self._detach()
                continue  # it filled up since its last report
            if self.link is link:
                self.session_live = bool(result.get("session"))
            if self.session_live:
                front.metrics.placed.labels(replica=name).inc()
            return

    async def _tell_position(self, position: int) -> None:
        slots = capacity(self._front.loads()).slots
        await self._send({"type": "queued", "position": position,
                          "message": f"all {slots} session slots are in use; you are number {position} in line "
                                     "and start when a slot frees"})

    # ------------------------------------------------------------------ everything else

    async def _relay(self, text: str) -> None:
        if self.link is None:
            name = pick_any_ready(self._front.loads())
            if name is None:
                raise RequestError("unavailable", "no avatar replica is ready; try again in a moment")
            try:
                await self._attach(name)
            except ReplicaGone as exc:
                self._front.replica_lost(name, str(exc))
                raise RequestError("unavailable", "no avatar replica is ready; try again in a moment") from None
        link = self.link
        try:
            result = await link.deliver(self.connection_id, text)
        except ReplicaGone as exc:
            await self._lost(link, str(exc))
            return
        if not result["open"]:
            await self._lost(link, "it no longer knows this page's connection (it was restarted)")
        elif self.link is link:
            self.session_live = bool(result.get("session"))

    async def _attach(self, name: str) -> None:
        link = self._front.links[name]
        connection_id = await within(link.open_connection(self.client), CONTROL_TIMEOUT_S, "a new connection", name)
        self.link, self.connection_id = link, connection_id
        self._pump = asyncio.get_running_loop().create_task(self._pump_messages(link, connection_id),
                                                            name=f"relay-{name}-{connection_id}")

    async def _pump_messages(self, link: ReplicaLink, connection_id: str) -> None:
        """The replica's messages to the page, in order, until the connection ends or the replica vanishes."""
        while True:
            try:
                result = await link.poll(connection_id, POLL_WAIT_S)
            except ReplicaGone as exc:
                await self._lost(link, str(exc))
                return
            for message in result["messages"]:
                if message.get("type") == "answer":
                    message = {**message, "replica": link.name}
                    if message.get("session_id"):  # the page's session is reachable by the sessions API too
                        self._front.api.remember(message["session_id"], link.name)
                await self._send(message)
            if self.link is not link:
                return
            if not result["open"]:
                await self._lost(link, "it no longer knows this page's connection (it was restarted)")
                return
            self.session_live = bool(result["session"])

    async def _lost(self, link: ReplicaLink, reason: str) -> None:
        """The replica holding this page vanished: tell the page as the single server does when its worker dies."""
        if self.link is not link:
            return  # already moved on
        had_session = self.session_live
        self.link, self.connection_id, self.session_live = None, None, False
        self._pump = None  # this may be the pump itself; it ends after this
        self._front.replica_lost(link.name, reason)
        if had_session:
            await self.refuse("worker_failed", f"the avatar replica {link.name} serving this session stopped "
                                               f"({reason}); this session's avatar was lost, start again")
            await self.refuse("connection_lost", "the media connection closed; start again")

    async def _detach(self) -> None:
        """Leave the current replica: stop pumping and close the page's connection there."""
        link, connection_id, pump = self.link, self.connection_id, self._pump
        self.link, self.connection_id, self.session_live, self._pump = None, None, False, None
        if pump is not None and pump is not asyncio.current_task():
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        if link is not None and connection_id is not None:
            try:
                await within(link.close_connection(connection_id), CONTROL_TIMEOUT_S, "closing a connection",
                             link.name)
            except Exception as exc:  # noqa: BLE001 - its lease runs out there if this did not reach it
                log.info("closing the page's connection on %s: %s", link.name, exc)

    async def close(self) -> None:
        await self._detach()
