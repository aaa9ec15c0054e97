"""WHEP egress: `POST /sessions/{id}/whep` (application/sdp offer) -> 201, `Location`, the SDP answer.

Each viewer is its own peer connection fed from `session.output` (one generation, any number of viewers,
all seeing the same frames and hearing the same voice); `DELETE` on its Location ends it, and it ends by
itself when its connection fails, never comes up (`--server.connect_timeout_s`) or the session closes.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription

from server.client_caps import CapExceeded, client_address
from server.sdp_check import OfferSdpError, check_viewer_sdp
from server.session import Session, close_peer_connection, ice_configuration
from server.sessions import ApiError, api_error, find_session
from server.signaling import MAX_SDP_CHARS, STATE_KEY, ServerState

log = logging.getLogger(__name__)

SDP_TYPE = "application/sdp"


async def read_sdp_offer(request: web.Request) -> str:
    """The body of a WHIP/WHEP POST: an SDP offer as `application/sdp` text (ApiError otherwise)."""
    if request.content_type != SDP_TYPE:
        raise ApiError("unsupported_media_type", f"send the SDP offer as Content-Type {SDP_TYPE}, "
                                                 f"got {request.content_type or 'none'!r}")
    if request.content_length is not None and request.content_length > MAX_SDP_CHARS:
        raise ApiError("too_large", f"the offer is {request.content_length} bytes; the limit is {MAX_SDP_CHARS}")
    try:
        sdp = (await request.read()).decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError("bad_offer", "the offer is not UTF-8 text; send the SDP from createOffer()") from None
    if not sdp.strip():
        raise ApiError("bad_offer", "the body is empty; send the SDP offer from createOffer()")
    if len(sdp) > MAX_SDP_CHARS:
        raise ApiError("too_large", f"the offer is {len(sdp)} characters; the limit is {MAX_SDP_CHARS}")
    return sdp


class Viewer:
    """One WHEP viewer of a session: its peer connection and its two output subscriptions."""

    def __init__(self, session: Session, state: ServerState, client: str) -> None:
        self.viewer_id = uuid.uuid4().hex[:12]
        self.session = session
        self._state = state
        self._client = client
        self.pc = RTCPeerConnection(ice_configuration(state.cfg))
        self.tracks = [session.output.subscribe("audio"), session.output.subscribe("video")]
        self._closing: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        state.caps.acquire("viewer", client)  # released when the viewer closes

        @self.pc.on("connectionstatechange")
        async def on_state() -> None:
            if self.pc.connectionState in ("failed", "closed"):
                self.close_soon()

    async def answer(self, sdp: str) -> str:
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            for track in self.tracks:
                self.pc.addTrack(track)
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as exc:  # noqa: BLE001 - aiortc raises many kinds on an SDP it cannot answer
            raise ApiError("bad_offer", f"the offer could not be answered ({type(exc).__name__}: {exc}); send "
                                        "the SDP from createOffer() unchanged") from None
        self._watch = asyncio.get_running_loop().create_task(self._expect_connection())
        return self.pc.localDescription.sdp

    async def _expect_connection(self) -> None:
        timeout_s = self._state.cfg.server.connect_timeout_s
        await asyncio.sleep(timeout_s)
        if self.pc.connectionState != "connected":
            log.info("WHEP viewer %s of session %s never connected within %g s; closed", self.viewer_id,
                     self.session.session_id, timeout_s)
            self.close_soon()

    def close_soon(self) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())

    async def close(self) -> None:
        self.close_soon()
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
        self.session.viewers.pop(self.viewer_id, None)
        for track in self.tracks:
            track.stop()
        await close_peer_connection(self.pc, f"WHEP viewer {self.viewer_id}")
        self._state.caps.release("viewer", self._client)


async def whep_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    client = client_address(request.remote)
    try:
        session = find_session(state, request.match_info["id"])
        sdp = await read_sdp_offer(request)
        try:
            check_viewer_sdp(sdp)
        except OfferSdpError as exc:
            raise ApiError("bad_offer", str(exc)) from None
        try:
            with state.caps.hold("offer", client):
                viewer = Viewer(session, state, client)
                try:
                    answer = await viewer.answer(sdp)
                except BaseException:
                    await viewer.close()
                    raise
        except CapExceeded as exc:
            raise ApiError(exc.code, str(exc), 429) from None
    except ApiError as exc:
        return api_error(exc, state)
    if session.closed.is_set():  # it ended while the answer was made
        await viewer.close()
        return api_error(ApiError("unknown_session", "the session ended"), state)
    session.viewers[viewer.viewer_id] = viewer
    session.last_used_s = time.monotonic()
    location = f"/sessions/{session.session_id}/whep/{viewer.viewer_id}"
    log.info("session %s: WHEP viewer %s from %s", session.session_id, viewer.viewer_id, client)
    return web.Response(status=201, text=answer, content_type=SDP_TYPE, headers={"Location": location})


async def whep_delete_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        session = find_session(state, request.match_info["id"])
        viewer = session.viewers.get(request.match_info["viewer"])
        if viewer is None:
            raise ApiError("unknown_viewer", f"session {session.session_id} has no viewer "
                                             f"{request.match_info['viewer'][:40]!r}", 404)
    except ApiError as exc:
        return api_error(exc, state)
    await viewer.close()
    return web.json_response({"id": session.session_id, "viewer": viewer.viewer_id, "closed": True})
