"""Offer/answer and live control: the `/ws` websocket (offer, set, stop; stats and errors back) and `POST /offer`.

Every message from the network is checked here; anything refused gets `{"type": "error", "code", "message"}`
naming what was wrong, and the connection (and the server) carries on.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from model.config import AppConfig
from server.admission import AdmissionQueue
from server.client_caps import CapExceeded, ClientCaps, client_address, close_when_idle
from server.engine import check_sample_steps
from server.limits import MessageLimits, hard_message_limit
from server.metrics import ServerMetrics
from server.reference_image import ReferenceImageError, image_from_data_url
from server.sdp_check import OfferSdpError, check_offer_sdp
from server.seam import ClipGenerator, EngineBusy, SessionClosed
from server.session import OfferError, Session

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 1000
MAX_SDP_CHARS = 100_000


class RequestError(ValueError):
    """A client message was refused; `code` is machine-readable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ServerState:
    """What every request handler shares: config, the engine, the default avatar, live sessions."""

    cfg: AppConfig
    engine: ClipGenerator
    default_reference: np.ndarray
    sessions: set[Session] = field(default_factory=set)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    admission: AdmissionQueue | None = None
    caps: ClientCaps | None = None
    default_rtmp_taken: bool = False  # `--rtmp URL` goes to the first session only

    def __post_init__(self) -> None:
        if self.admission is None:
            self.admission = AdmissionQueue(self.cfg.server.max_sessions, self.cfg.server.max_queued)
        if self.caps is None:
            self.caps = ClientCaps(self.cfg)

    def session_lost(self, session_id: str, reason: str) -> None:
        """The engine lost a session's model state (its worker died): tell that page and close the session."""
        for session in list(self.sessions):
            if session.session_id == session_id:
                session.fail("worker_failed", reason)

    async def close_all(self) -> None:
        await asyncio.gather(*(s.close() for s in list(self.sessions)), return_exceptions=True)


STATE_KEY = web.AppKey("state", ServerState)


def error_message(code: str, message: str) -> dict[str, str]:
    return {"type": "error", "code": code, "message": message}


def parse_offer(payload: dict[str, Any], state: ServerState) -> tuple[str, np.ndarray, str, int | None]:
    """Check an offer and its config: (sdp, reference image, prompt, sample_steps)."""
    sdp = payload.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise RequestError("bad_offer", "offer needs an 'sdp' string (from RTCPeerConnection.createOffer)")
    if len(sdp) > MAX_SDP_CHARS:
        raise RequestError("bad_offer", f"offer SDP is {len(sdp)} characters; the limit is {MAX_SDP_CHARS}")
    try:
        check_offer_sdp(sdp)
    except OfferSdpError as exc:
        raise RequestError("bad_offer", str(exc)) from None
    config = payload.get("config")
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise RequestError("bad_config", "offer 'config' must be an object")
    unknown = sorted(set(config) - {"reference_image", "prompt", "sample_steps"})
    if unknown:
        raise RequestError("bad_config", f"unknown config key {unknown[0]!r}; known: prompt, reference_image, "
                                         "sample_steps")
    return (sdp, *session_settings(config, state))


def session_settings(settings: dict[str, Any], state: ServerState) -> tuple[np.ndarray, str, int | None]:
    """A new session's reference image, prompt and sample_steps from an offer's config or an API session's body
    (absent keys: the server's defaults)."""
    reference = state.default_reference
    if settings.get("reference_image"):
        try:
            reference = image_from_data_url(settings["reference_image"], state.cfg.server.max_message_bytes)
        except ReferenceImageError as exc:
            raise RequestError("bad_reference_image", str(exc)) from None
    prompt = settings.get("prompt", state.cfg.server.prompt)
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError("bad_config", f"prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
    sample_steps = None
    if settings.get("sample_steps") is not None:
        sample_steps = parse_sample_steps(settings["sample_steps"])
    return reference, prompt, sample_steps


async def json_body(request: web.Request, max_bytes: int) -> Any:
    """The request's JSON body; RequestError naming why not (larger than `max_bytes`, not UTF-8, not JSON)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise RequestError("too_large", f"request is {request.content_length} bytes; the limit is {max_bytes}")
    try:
        return json.loads(await request.text())
    except json.JSONDecodeError as exc:
        raise RequestError("bad_json", f"body is not valid JSON ({exc.msg} at {exc.pos})") from None
    except UnicodeDecodeError as exc:
        raise RequestError("bad_json", f"body is not UTF-8 text (byte {exc.start}); send JSON") from None


def refusal(exc: RequestError) -> web.Response:
    """The HTTP answer to a refused offer: its JSON error with the status that names the kind of refusal."""
    status = {"busy": 503, "too_large": 413, CapExceeded.code: 429}.get(exc.code, 400)
    return web.json_response(error_message(exc.code, str(exc)), status=status)


def parse_sample_steps(value: Any) -> int:
    try:
        return check_sample_steps(value)
    except ValueError as exc:
        raise RequestError("bad_sample_steps", str(exc)) from None


async def open_session(state: ServerState, sdp: str, sdp_type: str, reference: np.ndarray, prompt: str,
                       sample_steps: int | None, on_error: Any = None, kind: str = "browser") -> tuple[Session, Any]:
    """Admit a session and answer its offer; on any failure everything it took is released."""
    from server.sessions import attach_outputs

    session = Session(state.cfg, state.engine, reference, on_error=on_error, kind=kind)
    try:
        await session.start(reference, prompt, sample_steps)
        answer = await session.accept(sdp, sdp_type)
    except EngineBusy as exc:
        await session.close()
        raise RequestError("busy", str(exc)) from None
    except OfferError as exc:
        await session.close()
        raise RequestError("bad_offer", str(exc)) from None
    except BaseException:
        await session.close()
        raise
    state.sessions.add(session)
    state.metrics.sessions_started.inc()
    asyncio.get_running_loop().create_task(forget_when_closed(state, session))
    attach_outputs(state, session)
    return session, answer


async def forget_when_closed(state: ServerState, session: Session) -> None:
    """Drop a session from the server's set once it has closed (whoever closed it)."""
    await session.closed.wait()
    state.sessions.discard(session)


class WebSocketConnection:
    """One page's websocket: at most one live session, its stats loop, and its controls."""

    def __init__(self, ws: web.WebSocketResponse, state: ServerState, client: str = "unknown") -> None:
        self._ws = ws
        self._state = state
        self.client = client
        self.offering = False  # an offer is being answered or waits in line
        self.session: Session | None = None
        self._stats_task: asyncio.Task | None = None
        self._sends: set[asyncio.Task] = set()  # fire-and-forget sends, held so they are not collected
        self.limits = MessageLimits(state.cfg.server.max_message_bytes, state.cfg.server.max_messages_per_s)
        self.gone: Any = lambda: ws.closed  # set by the handler to also notice a dropped transport

    async def send(self, message: dict[str, Any]) -> None:
        if message.get("type") == "error":
            self._state.metrics.error(message.get("code", "error"))
        if not self._ws.closed:
            try:
                await self._ws.send_json(message)
            except (ConnectionError, RuntimeError):
                pass  # the page went away; the read loop will notice

    def _send_soon(self, message: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self.send(message))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def handle_text(self, text: str) -> None:
        refused = self.limits.check(text)
        if refused is not None:
            await self.send(error_message(*refused))
            return
        try:
            await self._dispatch(text)
        except RequestError as exc:
            await self.send(error_message(exc.code, str(exc)))
        except Exception as exc:  # a bug must cost this message, not the page's connection
            log.exception("message refused by an unexpected error")
            await self.send(error_message("internal_error", f"the server could not handle this message "
                                                            f"({type(exc).__name__}); it was dropped"))

    async def _dispatch(self, text: str) -> None:
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError("bad_json", f"message is not valid JSON ({exc.msg} at {exc.pos})") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise RequestError("bad_message", 'message must be a JSON object with a "type" string')
        kind = message["type"]
        if kind == "offer":
            await self._offer(message)
        elif kind == "set":
            await self._set(message)
        elif kind == "stop":
            await self.close_session()
            await self.send({"type": "stopped"})
        else:
            raise RequestError("unknown_type", f"unknown message type {kind!r}; expected offer, set or stop")

    async def _offer(self, message: dict[str, Any]) -> None:
        if self.session is not None:
            raise RequestError("session_exists", 'this connection already has a session; send {"type":"stop"} '
                                                 "first")
        sdp, reference, prompt, steps = parse_offer(message, self._state)
        self.offering = True
        try:
            with self._state.caps.hold("offer", self.client):
                async with self._state.admission.turn(self._has_room, self._tell_position, self.gone):
                    session, answer = await open_session(
                        self._state, sdp, "offer", reference, prompt, steps,
                        on_error=lambda text, code: self._send_soon(error_message(code, text)))
        except EngineBusy as exc:  # the line is full, or this page left it
            raise RequestError("busy", str(exc)) from None
        except CapExceeded as exc:
            raise RequestError(exc.code, str(exc)) from None
        finally:
            self.offering = False
        self.session = session
        await self.send({"type": "answer", "sdp": answer.sdp, "session_id": session.session_id})
        self._stats_task = asyncio.create_task(self._stats_loop(session))

    def _has_room(self) -> bool:
        return len(self._state.sessions) < self._state.cfg.server.max_sessions

    async def _tell_position(self, position: int) -> None:
        await self.send({"type": "queued", "position": position,
                         "message": f"all {self._state.cfg.server.max_sessions} session slots are in use; you are "
                                    f"number {position} in line and start when a slot frees"})

    async def _set(self, message: dict[str, Any]) -> None:
        if self.session is None:
            raise RequestError("no_session", "nothing to set: start a session with an offer first")
        unknown = sorted(set(message) - {"type", "sample_steps"})
        if unknown or "sample_steps" not in message:
            raise RequestError("bad_message", 'set takes {"type":"set","sample_steps":N}')
        self.session.set_sample_steps(parse_sample_steps(message["sample_steps"]))

    async def _stats_loop(self, session: Session) -> None:
        interval_s = self._state.cfg.server.stats_interval_s
        while not session.closed.is_set():
            try:
                await asyncio.wait_for(session.closed.wait(), timeout=interval_s)
            except TimeoutError:
                try:
                    stats = session.stats()
                except SessionClosed:
                    continue  # closing: its engine slot is already released
                await self.send({"type": "stats", **stats})
        if self.session is session:  # it ended by itself (ICE failure, the browser left)
            self.session = None
            await self.send(error_message("connection_lost", "the media connection closed; start again"))

    async def close_session(self) -> None:
        session, self.session = self.session, None
        if self._stats_task is not None:
            self._stats_task.cancel()
            await asyncio.gather(self._stats_task, return_exceptions=True)
            self._stats_task = None
        if session is not None:
            await session.close()


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    """`/ws`: the page's control channel for the life of its session."""
    state = request.app[STATE_KEY]
    client = client_address(request.remote)
    try:
        state.caps.acquire("websocket", client)
    except CapExceeded as exc:
        state.metrics.error(exc.code)
        return web.json_response(error_message(exc.code, str(exc)), status=429)
    try:
        return await _serve_websocket(request, state, client)
    finally:
        state.caps.release("websocket", client)


async def _serve_websocket(request: web.Request, state: ServerState, client: str) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=hard_message_limit(state.cfg), heartbeat=20.0)
    await ws.prepare(request)
    connection = WebSocketConnection(ws, state, client)
    connection.gone = lambda: ws.closed or request.transport is None or request.transport.is_closing()
    timeout_s = state.cfg.server.offer_timeout_s

    async def close_idle() -> None:
        log.info("websocket from %s closed: no offer nor session for %g s", client, timeout_s)
        await connection.send(error_message("offer_timeout", f"no offer arrived within {timeout_s:g} s "
                                                             "(--server.offer_timeout_s); connect again to start"))
        await ws.close()

    watcher = asyncio.create_task(close_when_idle(
        lambda: connection.session is None and not connection.offering, close_idle, timeout_s))
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await connection.handle_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await connection.send(error_message("bad_message", "binary messages are not accepted; send JSON text"))
            elif msg.type == WSMsgType.ERROR:
                log.info("websocket closed with error: %s", ws.exception())
                break
    finally:
        watcher.cancel()
        await connection.close_session()
    return ws


async def offer_handler(request: web.Request) -> web.Response:
    """`POST /offer` `{sdp, type, config?}` -> `{sdp, type}`: the plain-HTTP offer of aiortc's examples."""
    state = request.app[STATE_KEY]
    try:
        payload = await json_body(request, state.cfg.server.max_message_bytes)
        if not isinstance(payload, dict):
            raise RequestError("bad_message", "body must be a JSON object {sdp, type}")
        sdp_type = payload.get("type", "offer")
        if sdp_type != "offer":
            raise RequestError("bad_offer", f"expected an SDP of type 'offer', got {sdp_type!r}")
        sdp, reference, prompt, steps = parse_offer(payload, state)
        try:
            with state.caps.hold("offer", client_address(request.remote)):
                session, answer = await open_session(state, sdp, sdp_type, reference, prompt, steps, kind="offer")
        except CapExceeded as exc:
            raise RequestError(exc.code, str(exc)) from None
    except RequestError as exc:
        state.metrics.error(exc.code)
        return refusal(exc)
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "session_id": session.session_id})
