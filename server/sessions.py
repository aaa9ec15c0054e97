"""The sessions API: sessions a bot drives (`POST /sessions`), speech and interruption for every session,
listing, ending, recordings.

    POST   /sessions                  {reference_image?, prompt?, sample_steps?, record?, rtmp?} -> 201 {id, whep}
    GET    /sessions                  every live session (browser, offer, api, whip)
    GET    /sessions/{id}             one of them
    DELETE /sessions/{id}             end it
    POST   /sessions/{id}/speak       an audio file (Content-Type audio/*) or {"text", "voice"?}; ?interrupt=1
    POST   /sessions/{id}/interrupt   drop the queued speech; the avatar idles again
    GET    /sessions/{id}/recording   the fragmented MP4 of a `record: true` session

Every error is `{"type": "error", "code", "message"}` with a 4xx/5xx status; nothing is left running
after a refused request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web

from server.recorder import SessionRecorder
from server.rtmp import RtmpPush, RtmpUrlError, check_rtmp_url
from server.seam import EngineBusy, SessionLost
from server.session import Session
from server.signaling import (
    STATE_KEY,
    RequestError,
    ServerState,
    error_message,
    forget_when_closed,
    session_settings,
)
from server.speech_input import SpeechError, decode_speech
from server.tts import check_voice, synthesize

log = logging.getLogger(__name__)

CREATE_KEYS = ("reference_image", "prompt", "sample_steps", "record", "rtmp")
AUDIO_TYPES = ("audio/", "application/ogg", "video/mp4", "video/ogg", "video/webm")
STATUS = {"unknown_session": 404, "no_recording": 404, "busy": 503, "too_large": 413, "speech_too_long": 413,
          "speech_queue_full": 429, "unsupported_media_type": 415, "tts_unavailable": 503, "tts_failed": 500}


class ApiError(Exception):
    """A refused API request: HTTP status, code, message."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status or STATUS.get(code, 400)


def api_error(exc: ApiError, state: ServerState) -> web.Response:
    state.metrics.error(exc.code)
    return web.json_response(error_message(exc.code, str(exc)), status=exc.status)


def find_session(state: ServerState, session_id: str) -> Session:
    for session in state.sessions:
        if session.session_id == session_id and not session.closed.is_set():
            return session
    raise ApiError("unknown_session", f"no live session {session_id[:40]!r}; GET /sessions lists them")


def describe(session: Session) -> dict[str, Any]:
    """What GET /sessions shows of one session."""
    recorder, rtmp = session.recorder, session.rtmp
    return {"id": session.session_id, "kind": session.kind, "age_s": round(time.monotonic() - session.started_s, 1),
            "clips": session.clips_played, "queue_s": round(session.speech.queue.queued_s, 2),
            "viewers": len(session.viewers), "connection": session.connection_state,
            "whep": f"/sessions/{session.session_id}/whep",
            "recording": f"/sessions/{session.session_id}/recording" if recorder else None,
            "rtmp": rtmp.describe() if rtmp else None}


def attach_outputs(state: ServerState, session: Session, record: bool = False, rtmp: str | None = None) -> None:
    """Recording and RTMP push as asked; the server's `--rtmp` URL goes to the first session it serves."""
    if rtmp is None and state.cfg.server.rtmp and not state.default_rtmp_taken:
        rtmp = state.cfg.server.rtmp
        state.default_rtmp_taken = True
    if record:
        session.recorder = SessionRecorder(session, state.cfg.server.recording_dir)
    if rtmp:
        session.rtmp = RtmpPush(session, rtmp)


def in_use(session: Session) -> bool:
    """Someone is listening to or talking through this session."""
    return bool(session.speech.queue.speaking or session.viewers
                or (session.rtmp is not None and session.rtmp.state == "live")
                or session.connection_state == "connected")


async def end_when_unused(session: Session, timeout_s: float) -> None:
    """An API session with no speech, viewer or push for `timeout_s` ends (nobody would notice it)."""
    while not session.closed.is_set():
        await asyncio.sleep(min(1.0, timeout_s / 4))
        now = time.monotonic()
        if in_use(session):
            session.last_used_s = now
        elif now - session.last_used_s > timeout_s:
            log.info("session %s: unused for %g s (--server.session_idle_timeout_s), ending it",
                     session.session_id, timeout_s)
            session.close_soon()
            return


# ---------------------------------------------------------------------------------------------- handlers


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError("bad_json", f"body is not valid JSON ({exc})") from None


def _parse_create(body: Any, state: ServerState) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError("bad_config", "body must be a JSON object " + "{" + ", ".join(CREATE_KEYS) + "} (all optional)")
    unknown = sorted(set(body) - set(CREATE_KEYS))
    if unknown:
        raise ApiError("bad_config", f"unknown key {unknown[0]!r}; known: {', '.join(CREATE_KEYS)}")
    try:
        reference, prompt, steps = session_settings(body, state)
    except RequestError as exc:
        raise ApiError(exc.code, str(exc)) from None
    record = body.get("record", False)
    if not isinstance(record, bool):
        raise ApiError("bad_config", f"record must be true or false, got {record!r}")
    rtmp = body.get("rtmp")
    if rtmp is not None:
        try:
            rtmp = check_rtmp_url(rtmp)
        except RtmpUrlError as exc:
            raise ApiError("bad_url", str(exc)) from None
    return {"reference": reference, "prompt": prompt, "sample_steps": steps, "record": record, "rtmp": rtmp}


async def start_session(state: ServerState, kind: str, reference: Any, prompt: str,
                        sample_steps: int | None) -> Session:
    """Admit a session of `kind` into the engine (ApiError busy if full) and register it."""
    session = Session(state.cfg, state.engine, reference, kind=kind)
    try:
        await session.start(reference, prompt, sample_steps)
    except (EngineBusy, SessionLost) as exc:
        await session.close()
        raise ApiError("busy", str(exc), 503) from None
    except BaseException:
        await session.close()
        raise
    state.sessions.add(session)
    state.metrics.sessions_started.inc()
    asyncio.get_running_loop().create_task(forget_when_closed(state, session))
    return session


async def create_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        options = _parse_create(await _json_body(request), state)
        session = await start_session(state, "api", options["reference"], options["prompt"], options["sample_steps"])
    except ApiError as exc:
        return api_error(exc, state)
    session.start_feeder()
    attach_outputs(state, session, options["record"], options["rtmp"])
    session.spawn(end_when_unused(session, state.cfg.server.session_idle_timeout_s), "idle-timeout")
    log.info("session %s: created by the API for %s", session.session_id, request.remote)
    body = describe(session)
    return web.json_response(body, status=201, headers={"Location": f"/sessions/{session.session_id}"})


async def list_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    sessions = sorted((s for s in state.sessions if not s.closed.is_set()), key=lambda s: s.started_s)
    return web.json_response({"sessions": [describe(s) for s in sessions]})


async def get_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        return web.json_response(describe(find_session(state, request.match_info["id"])))
    except ApiError as exc:
        return api_error(exc, state)


async def delete_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        session = find_session(state, request.match_info["id"])
    except ApiError as exc:
        return api_error(exc, state)
    await session.close()
    return web.json_response({"id": session.session_id, "closed": True})


async def _read_audio(request: web.Request, max_bytes: int) -> bytes:
    """The body, refused as soon as it passes `max_bytes` (never read whole into memory past that)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError("too_large", f"audio is {request.content_length} bytes; the limit is {max_bytes} "
                                    "(--server.max_audio_bytes)")
    chunks, total = [], 0
    while chunk := await request.content.read(1 << 16):
        total += len(chunk)
        if total > max_bytes:
            raise ApiError("too_large", f"audio is more than {max_bytes} bytes (--server.max_audio_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _speech_from_request(request: web.Request, state: ServerState) -> Any:
    cfg = state.cfg.server
    content_type = request.content_type.lower()
    if content_type.startswith(AUDIO_TYPES):
        data = await _read_audio(request, cfg.max_audio_bytes)
        return await asyncio.get_running_loop().run_in_executor(None, decode_speech, data, cfg.max_speech_s)
    if content_type == "application/json":
        body = await _json_body(request)
        if not isinstance(body, dict) or set(body) - {"text", "voice"}:
            raise ApiError("bad_message", 'speak takes {"text": "...", "voice"?: "en"} or an audio file')
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError("bad_text", "text must be a non-empty string")
        if len(text) > cfg.max_text_chars:
            raise ApiError("too_large", f"text is {len(text)} characters; the limit is {cfg.max_text_chars} "
                                        "(--server.max_text_chars): send it in parts", 413)
        voice = check_voice(body.get("voice", cfg.tts_voice))
        return await synthesize(text, voice, cfg.max_speech_s)
    raise ApiError("unsupported_media_type", f"Content-Type {content_type or 'none'!r} is not speech: send an "
                                             "audio file (audio/wav, audio/mpeg, audio/ogg, audio/mp4, audio/flac) "
                                             "or application/json {\"text\": ...}")


async def speak_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        session = find_session(state, request.match_info["id"])
        interrupt = request.query.get("interrupt", "0")
        if interrupt not in ("0", "1", "true", "false"):
            raise ApiError("bad_query", f"interrupt must be 1 or 0, got {interrupt[:20]!r}")
        try:
            pcm = await _speech_from_request(request, state)
        except SpeechError as exc:
            raise ApiError(exc.code, str(exc)) from None
        if session.closed.is_set():
            raise ApiError("unknown_session", f"session {session.session_id!r} ended while its speech was read")
        dropped_s = session.interrupt() if interrupt in ("1", "true") else 0.0
        try:
            ahead_s = session.speech.queue.add(pcm)
        except SpeechError as exc:
            raise ApiError(exc.code, str(exc)) from None
    except ApiError as exc:
        return api_error(exc, state)
    session.last_used_s = time.monotonic()
    duration_s = len(pcm) / 48000
    return web.json_response({"id": session.session_id, "duration_s": round(duration_s, 3),
                              "starts_in_s": round(ahead_s, 3), "queued_s": round(ahead_s + duration_s, 3),
                              "dropped_s": round(dropped_s, 3)}, status=202)


async def interrupt_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        session = find_session(state, request.match_info["id"])
    except ApiError as exc:
        return api_error(exc, state)
    return web.json_response({"id": session.session_id, "dropped_s": round(session.interrupt(), 3)})


async def recording_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    session_id = request.match_info["id"]
    recorder = None
    for session in state.sessions:
        if session.session_id == session_id:
            recorder = session.recorder
    path = recorder.path if recorder else _finished_recording(state, session_id)
    if path is None or not path.is_file():
        return api_error(ApiError("no_recording", f"no recording for session {session_id[:40]!r}: create the "
                                                  "session with \"record\": true"), state)
    return web.FileResponse(path, headers={"Content-Type": "video/mp4", "Cache-Control": "no-cache"})


def _finished_recording(state: ServerState, session_id: str) -> Any:
    """A recording of a session that has ended (the id must look like one: no paths from the URL)."""
    from pathlib import Path

    if not (len(session_id) == 12 and all(c in "0123456789abcdef" for c in session_id)):
        return None
    return Path(state.cfg.server.recording_dir).resolve() / f"{session_id}.mp4"


def add_session_routes(app: web.Application) -> None:
    """The sessions API, WHEP viewers and WHIP ingest."""
    from server.whep import whep_delete_handler, whep_handler
    from server.whip import whip_delete_handler, whip_handler

    app.router.add_post("/sessions", create_handler)
    app.router.add_get("/sessions", list_handler)
    app.router.add_get("/sessions/{id}", get_handler)
    app.router.add_delete("/sessions/{id}", delete_handler)
    app.router.add_post("/sessions/{id}/speak", speak_handler)
    app.router.add_post("/sessions/{id}/interrupt", interrupt_handler)
    app.router.add_get("/sessions/{id}/recording", recording_handler)
    app.router.add_post("/sessions/{id}/whep", whep_handler)
    app.router.add_delete("/sessions/{id}/whep/{viewer}", whep_delete_handler)
    app.router.add_post("/whip", whip_handler)
    app.router.add_delete("/whip/{id}", whip_delete_handler)
