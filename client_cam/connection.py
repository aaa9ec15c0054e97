"""One WebRTC session with the server: offer over `/ws`, our voice out, the avatar's video and voice in,
until the connection drops (then `run` returns why) or fails to start (then it raises ServerRefused).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from client_cam.output import AvatarOutput
from client_cam.signaling import ServerLink, ServerRefused, offer_message, refusal_from_error

log = logging.getLogger(__name__)

# aiortc's receivers hold what arrives before handing it on: an audio frame until 4 more packets came (its
# jitter buffer's prefetch), a video frame until the first packet of the next frame. The recording takes these
# off, so the voice is not placed later than its frames.
AUDIO_PREFETCH_PACKETS = 4
ANSWER_TIMEOUT_S = 60.0  # the server loads the session's avatar before it answers (not counted while queued)
CONNECT_TIMEOUT_S = 20.0  # ICE and DTLS after the answer


@dataclass
class LiveState:
    """What the status line shows about the connection."""

    phase: str = "connecting"
    server_stats: dict[str, Any] = field(default_factory=dict)
    connected_s: float | None = None
    sessions: int = 0  # connections that came up, reconnects included


class Connection:
    """One peer connection and its websocket; `run()` lasts as long as the session does."""

    def __init__(self, link: ServerLink, http: aiohttp.ClientSession, mic: MediaStreamTrack,
                 output: AvatarOutput, state: LiveState, settings: dict[str, Any],
                 on_notice: Callable[[str], None]) -> None:
        self._link = link
        self._http = http
        self._mic = mic
        self._output = output
        self._state = state
        self._settings = settings
        self._notice = on_notice
        self._pc: RTCPeerConnection | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task] = []
        self._ended = asyncio.Event()
        self._end_reason = ""

    def _end(self, reason: str) -> None:
        if not self._ended.is_set():
            self._end_reason = reason
            self._ended.set()

    async def run(self) -> str:
        """Connect, then receive until the session ends; returns the reason it ended."""
        try:
            await self._start()
            await self._ended.wait()
            return self._end_reason
        finally:
            await self.close()

    async def _start(self) -> None:
        ice = await self._link.ice_servers(self._http)
        self._output.new_connection()
        self._pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        pc.addTrack(self._mic)
        pc.addTransceiver("video", direction="recvonly")

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            reader = self._read_video if track.kind == "video" else self._read_audio
            self._tasks.append(asyncio.create_task(reader(track), name=f"read-{track.kind}"))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._end(f"media connection {pc.connectionState}")

        await pc.setLocalDescription(await pc.createOffer())
        self._ws = await self._link.open_socket(self._http)
        await self._ws.send_json(offer_message(pc.localDescription.sdp, **self._settings))
        await self._await_answer()
        self._tasks.append(asyncio.create_task(self._read_messages(), name="ws-messages"))
        await self._await_connected()

    async def _await_answer(self) -> None:
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while True:
            try:
                msg = await self._ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                raise ServerRefused("no_answer", f"the server at {self._link.url} did not answer the offer within "
                                                 f"{ANSWER_TIMEOUT_S:g} s", retry=True) from None
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ServerRefused("connection_lost", f"the server at {self._link.url} closed the websocket "
                                                       "before answering", retry=True)
            message = json.loads(msg.data)
            kind = message.get("type")
            if kind == "answer":
                await self._pc.setRemoteDescription(RTCSessionDescription(sdp=message["sdp"], type="answer"))
                return
            if kind == "queued":
                self._state.phase = f"waiting in line (number {message.get('position')})"
                self._notice(f"waiting: {message.get('message')}")
                deadline = time.monotonic() + ANSWER_TIMEOUT_S  # our turn comes when a slot frees
            elif kind == "error":
                raise refusal_from_error(message)

    async def _await_connected(self) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while self._pc.connectionState != "connected":
            if self._ended.is_set() or time.monotonic() > deadline:
                raise ServerRefused("connect_timeout", f"the media connection to {self._link.url} did not come up "
                                                       f"within {CONNECT_TIMEOUT_S:g} s (ICE state "
                                                       f"{self._pc.iceConnectionState}); check UDP between the two "
                                                       "machines or the server's --ice_servers", retry=True)
            await asyncio.sleep(0.05)
        self._state.phase = "connected"
        self._state.connected_s = time.monotonic()
        self._state.sessions += 1

    async def _read_messages(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            message = json.loads(msg.data)
            if message.get("type") == "stats":
                self._state.server_stats = message
            elif message.get("type") == "error":
                refusal = refusal_from_error(message)
                if message.get("code") in ("connection_lost", "worker_failed", "connect_timeout"):
                    self._end(str(refusal))
                    return
                self._notice(f"server: {refusal}")
        self._end("the server closed the connection")

    async def _read_video(self, track: MediaStreamTrack) -> None:
        last_pts: int | None = None
        period_s = 0.0  # the smallest frame step seen: one frame period
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                self._end("the video stopped")
                return
            if last_pts is not None and frame.pts > last_pts:
                step_s = float((frame.pts - last_pts) * frame.time_base)
                period_s = step_s if period_s == 0 else min(period_s, step_s)
            last_pts = frame.pts
            self._output.on_video(frame.to_ndarray(format="rgb24"), frame.pts, float(frame.time_base), period_s)

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        mono = av.AudioResampler(format="s16", layout="mono", rate=48000)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            pts_s = float(frame.pts * frame.time_base)
            held_s = AUDIO_PREFETCH_PACKETS * frame.samples / frame.sample_rate
            for out in mono.resample(frame):
                self._output.on_audio(out.to_ndarray().reshape(-1), pts_s, held_s)

    async def close(self) -> None:
        """Say stop (the server frees the slot at once), then close the websocket and the peer connection."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None and not self._ws.closed:
            try:
                await asyncio.wait_for(self._ws.send_json({"type": "stop"}), 1.0)
            except (ConnectionError, RuntimeError, TimeoutError, aiohttp.ClientError):
                pass
            await self._ws.close()
        if self._pc is not None:
            await self._pc.close()
        self._state.phase = "disconnected"
