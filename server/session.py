"""One browser's live session: its peer connection, audio in, clips through the engine, tracks out.

A session is closed exactly once, by whoever notices first (Stop, the websocket closing, ICE failing):
its tasks end, its queued model work is cancelled and its peer connection is released.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from model.config import AppConfig
from model.io_types import AudioWindow, VideoClip
from server.audio_window import AudioWindowCutter, frame_stream_time_s
from server.ice import server_ice_configuration
from server.playout import PlayoutClock
from server.reference_image import resize_rgb
from server.seam import ClipDropped, ClipGenerator, SessionClosed, SessionLost
from server.tracks import AvatarVideoTrack, SyncedAudioTrack

log = logging.getLogger(__name__)


class OfferError(ValueError):
    """The browser's offer cannot be served (e.g. no audio to listen to); the message says why."""


def ice_configuration(cfg: AppConfig) -> RTCConfiguration:
    """STUN/TURN servers from the config (none by default: host candidates suffice on a LAN)."""
    return server_ice_configuration(cfg)


class Session:
    """Wires one peer connection: mic -> windows -> engine -> avatar video + synced voice."""

    def __init__(self, cfg: AppConfig, engine: ClipGenerator, reference_rgb: np.ndarray,
                 on_error: Callable[[str, str], Any] | None = None) -> None:
        self.session_id = uuid.uuid4().hex[:12]
        self._cfg = cfg
        self._engine = engine
        fmt = engine.stream_format.for_reference(reference_rgb.shape[:2])  # this session's frame size
        self.format = fmt
        self.clock = PlayoutClock(margin_s=cfg.server.playout_margin_s)
        frame_h, frame_w = fmt.frame_size
        self.reference_rgb = resize_rgb(reference_rgb, frame_h, frame_w)
        self.video_track = AvatarVideoTrack(self.clock, self.reference_rgb, fmt.fps)
        self.audio_track = SyncedAudioTrack(self.clock)
        self._cutter = AudioWindowCutter(fmt.sample_rate_hz, fmt.clip_samples, fmt.context_samples)
        self._pc = RTCPeerConnection(ice_configuration(cfg))
        self._tasks: set[asyncio.Task] = set()
        self._on_error = on_error
        self._closing: asyncio.Task | None = None
        self.closed = asyncio.Event()
        self.clips_played = 0
        self.clips_failed = 0
        self.started_s = time.monotonic()

        @self._pc.on("connectionstatechange")
        async def on_connection_state() -> None:
            log.info("session %s: connection %s", self.session_id, self._pc.connectionState)
            if self._pc.connectionState in ("failed", "closed"):
                self.close_soon()

        @self._pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._spawn(self._pump_audio(track), "audio-in")

    @property
    def connection_state(self) -> str:
        return self._pc.connectionState

    async def start(self, reference_image: np.ndarray, prompt: str, sample_steps: int | None = None) -> None:
        """Take a slot in the engine (EngineBusy if none is free) and prepare the avatar."""
        await self._engine.start(self.session_id, reference_image, prompt)
        if sample_steps is not None:
            self._engine.set_sample_steps(self.session_id, sample_steps)

    async def accept(self, sdp: str, sdp_type: str = "offer") -> RTCSessionDescription:
        """Answer the browser's offer: its mic comes in, the avatar and the delayed voice go out."""
        if sdp_type != "offer":
            raise OfferError(f"expected an SDP of type 'offer', got {sdp_type!r}")
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:  # noqa: BLE001 - aiortc raises ValueError, AssertionError, KeyError, ... on bad SDP
            raise OfferError(f"the offer's SDP could not be parsed ({type(exc).__name__}: {exc})") from None
        kinds = [t.kind for t in self._pc.getTransceivers()]
        if "audio" not in kinds:
            raise OfferError("the offer has no audio track; the avatar needs the microphone "
                             "(add an audio track or transceiver)")
        if "video" not in kinds:
            raise OfferError("the offer cannot receive video; add a recvonly video transceiver")
        self._pc.addTrack(self.audio_track)
        self._pc.addTrack(self.video_track)
        try:
            await self._pc.setLocalDescription(await self._pc.createAnswer())
        except Exception as exc:  # noqa: BLE001 - parsed but unanswerable (e.g. a BUNDLE naming a missing mid)
            raise OfferError(f"the offer could not be answered ({type(exc).__name__}: {exc}); send the SDP "
                             "from RTCPeerConnection.createOffer() unchanged") from None
        self._spawn(self._expect_connection(self._cfg.server.connect_timeout_s), "connect-timeout")
        return self._pc.localDescription

    async def _expect_connection(self, timeout_s: float) -> None:
        """A browser that got its answer but never connects (ICE or DTLS failing) must not hold a slot."""
        started_s = time.monotonic()
        while self._pc.connectionState != "connected":
            if time.monotonic() - started_s > timeout_s:
                self.fail("connect_timeout", f"the media connection did not come up within {timeout_s:g} s "
                                             f"(ICE state {self._pc.iceConnectionState}); check the network or "
                                             "the STUN/TURN servers (--server.ice_servers), then start again")
                return
            await asyncio.sleep(0.1)

    def set_sample_steps(self, sample_steps: int) -> None:
        """Live tuning from the page; takes effect at the next clip to start."""
        self._engine.set_sample_steps(self.session_id, sample_steps)

    def stats(self) -> dict[str, Any]:
        """What the page's readout shows; sent about once a second."""
        gen = self._engine.stats(self.session_id)
        delay_s = self.clock.delay_at(time.monotonic())  # a stall going on counts
        return {
            "frames_sent": self.video_track.frames_sent,
            "clip_frames_sent": self.video_track.clip_frames_sent,
            "held_frames_sent": self.video_track.held_frames_sent,
            "idle_frames_sent": self.video_track.idle_frames_sent,
            "queue_depth": gen.queue_depth,
            "clips_done": gen.clips_done,
            "clips_dropped": gen.clips_dropped,
            "clips_played": self.clips_played,
            "clip_index": gen.last_clip_index,
            "clip_sample_steps": gen.last_clip_sample_steps,
            "generation_ms": None if gen.last_generation_s is None else round(gen.last_generation_s * 1000, 1),
            "first_part_ms": None if gen.last_first_part_s is None else round(gen.last_first_part_s * 1000, 1),
            "clip_ms": round(self.format.frames_per_clip / self.format.fps * 1000, 1),
            "latency_ms": None if delay_s is None else round(delay_s * 1000, 1),
            "sample_steps": gen.sample_steps,
        }

    # ------------------------------------------------------------------ the live path

    async def _pump_audio(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return  # the browser stopped sending
            self.push_audio(frame)

    def push_audio(self, frame: Any) -> int:
        """One decoded mic frame into the live path (windows -> engine -> tracks); returns windows started."""
        arrival_s = time.monotonic()
        self.clock.note_audio(frame_stream_time_s(frame) + frame.samples / frame.sample_rate, arrival_s)
        self.audio_track.push(frame)
        windows = self._cutter.push(frame)
        for window in windows:
            self._spawn(self._make_clip(window), f"clip-{window.clip_index}")
        return len(windows)

    async def _make_clip(self, window: AudioWindow) -> None:
        try:
            await self._engine.submit(self.session_id, window, on_part=self._play_part)
        except ClipDropped:
            self._no_video(window)
            return
        except SessionClosed:
            return
        except SessionLost as exc:
            self.fail("worker_failed", str(exc))
            return
        except Exception as exc:  # the model failed on this clip; the session goes on with idle frames
            self._no_video(window)
            self.clips_failed += 1
            log.exception("session %s: clip %d failed", self.session_id, window.clip_index)
            self._report("clip_failed", f"clip {window.clip_index} could not be generated: {exc}")
            return

    def _play_part(self, part: VideoClip) -> None:
        """A clip's part is ready (the engine calls this on the loop, in order): schedule it by its t0.

        The first part sets the clip's latency (what the viewer waits for); a clip counts as played once,
        on its final part.
        """
        self.clock.note_clip_ready(part.t0, part.t0 + part.duration_s, time.monotonic(),
                                   first_part=part.offset == 0)
        self.video_track.add_clip(part)
        if part.final:
            self.clips_played += 1

    def _no_video(self, window: AudioWindow) -> None:
        """A clip that will not come (dropped, or failed part-way): playout goes on through its time
        with idle frames and the voice, instead of waiting for it."""
        clip_s = self.format.frames_per_clip / self.format.fps
        self.clock.note_no_video(window.t0, window.t0 + clip_s, time.monotonic())

    def _report(self, code: str, message: str) -> None:
        if self._on_error is not None:
            self._on_error(message, code)

    def fail(self, code: str, message: str) -> None:
        """The session cannot go on (its model state was lost, it never connected): say why, then close."""
        if self._closing is None and not self.closed.is_set():
            log.warning("session %s: %s", self.session_id, message)
            self._report(code, message)
            self.close_soon()

    def _spawn(self, coro: Any, name: str) -> None:
        if self.closed.is_set() or self._closing is not None:
            coro.close()
            return
        task = asyncio.create_task(coro, name=f"session-{self.session_id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ teardown

    def close_soon(self) -> None:
        """Start closing without waiting (safe from callbacks)."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(), name=f"session-{self.session_id}-close")

    async def close(self) -> None:
        """Close everything this session holds; returns when it is all released."""
        self.close_soon()
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._engine.stop(self.session_id)
            self.video_track.stop()
            self.audio_track.stop()
            try:
                await self._pc.close()
            except Exception:  # a half-negotiated pc (a refused offer) can fail to close part-way
                log.warning("session %s: peer connection did not close cleanly", self.session_id, exc_info=True)
                await _stop_transports(self._pc)
        finally:
            self.closed.set()
            log.info("session %s closed after %.1f s", self.session_id, time.monotonic() - self.started_s)


async def _stop_transports(pc: RTCPeerConnection) -> None:
    """Stop whatever DTLS/ICE transports a partly negotiated peer connection holds (their sockets, tasks)."""
    for transceiver in pc.getTransceivers():
        dtls = transceiver.receiver.transport
        for transport in (dtls, getattr(dtls, "transport", None)):
            if transport is None:
                continue
            try:
                await transport.stop()
            except Exception:
                log.debug("transport did not stop cleanly", exc_info=True)
