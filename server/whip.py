"""WHIP ingest: `POST /whip` (application/sdp offer) -> 201, `Location: /whip/{id}`, the SDP answer.

The client's audio drives a new session exactly as a microphone does (its video is declined); the avatar is
watched over WHEP (`/sessions/{id}/whep`, also in the `Link` header) and, with `?rtmp=URL` or
`?record=1`, pushed or recorded. `DELETE /whip/{id}` ends it. Encoders such as OBS cannot send a JSON body,
so the options ride in the query.
"""
from __future__ import annotations

import logging

from aiohttp import web

from server.client_caps import CapExceeded, client_address
from server.rtmp import RtmpUrlError, check_rtmp_url
from server.sdp_check import OfferSdpError, check_offer_sdp
from server.session import OfferError
from server.sessions import ApiError, api_error, attach_outputs, find_session, start_session
from server.signaling import STATE_KEY
from server.whep import SDP_TYPE, read_sdp_offer

log = logging.getLogger(__name__)


async def whip_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    client = client_address(request.remote)
    try:
        unknown = sorted(set(request.query) - {"record", "rtmp", "token"})
        if unknown:
            raise ApiError("bad_query", f"unknown query parameter {unknown[0]!r}; known: record, rtmp")
        record = request.query.get("record", "0")
        if record not in ("0", "1", "true", "false"):
            raise ApiError("bad_query", f"record must be 1 or 0, got {record[:20]!r}")
        rtmp = request.query.get("rtmp")
        if rtmp is not None:
            try:
                rtmp = check_rtmp_url(rtmp)
            except RtmpUrlError as exc:
                raise ApiError("bad_url", str(exc)) from None
        sdp = await read_sdp_offer(request)
        try:
            check_offer_sdp(sdp, needs_mic=True, needs_video_out=False)
        except OfferSdpError as exc:
            raise ApiError("bad_offer", str(exc)) from None
        try:
            with state.caps.hold("offer", client):
                session = await start_session(state, "whip", state.default_reference, state.cfg.server.prompt, None)
                try:
                    answer = await session.accept_ingest(sdp)
                except OfferError as exc:
                    await session.close()
                    raise ApiError("bad_offer", str(exc)) from None
                except BaseException:
                    await session.close()
                    raise
        except CapExceeded as exc:
            raise ApiError(exc.code, str(exc), 429) from None
    except ApiError as exc:
        return api_error(exc, state)
    attach_outputs(state, session, record in ("1", "true"), rtmp)
    log.info("session %s: WHIP ingest from %s", session.session_id, client)
    whep = f"/sessions/{session.session_id}/whep"
    return web.Response(status=201, text=answer.sdp, content_type=SDP_TYPE,
                        headers={"Location": f"/whip/{session.session_id}", "Link": f'<{whep}>; rel="whep"',
                                 "X-Session-Id": session.session_id})


async def whip_delete_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        session = find_session(state, request.match_info["id"])
        if session.kind != "whip":
            raise ApiError("unknown_session", f"session {session.session_id} is not a WHIP session; "
                                              "DELETE /sessions/{id} ends any session", 404)
    except ApiError as exc:
        return api_error(exc, state)
    await session.close()
    return web.json_response({"id": session.session_id, "closed": True})
