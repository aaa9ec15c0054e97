"""One live session: audio in (a microphone, WHIP, or speech the sessions API queues), clips through the
engine, the avatar's video and voice out through `session.output` to every subscriber.

Kinds: `browser` (the page's `/ws`), `offer` (`POST /offer`), `api` (`POST /sessions`: no peer connection,
driven by `speak`) and `whip` (`POST /whip`: audio in, nothing sent back). A session is closed exactly once,
by whoever notices first (Stop, the websocket closing, ICE failing, DELETE, the idle timeout): its tasks end,
its queued model work is cancelled, its outputs and its peer connection are released.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from model.config import AppConfig
from model.io_types import AudioWindow, VideoClip
from server.audio_window import AudioWindowCutter, frame_stream_time_s
from server.ice import server_ice_configuration
from server.output import SessionOutput
from server.playout import PlayoutClock
from server.reference_image import resize_rgb
from server.sdp_check import offer_sends_audio
from server.seam import ClipDropped, ClipGenerator, SessionClosed, SessionLost
from server.speech_input import SpeechInput
from server.tracks import AvatarVideoTrack, SyncedAudioTrack

log = logging.getLogger(__name__)


class OfferError(ValueError):
    """The browser's offer cannot be served (e.g. no audio to listen to); the message says why."""


def ice_configuration(cfg: AppConfig) -> RTCConfiguration:
    """STUN/TURN servers from the config (none by default: host candidates suffice on a LAN)."""
    return server_ice_configuration(cfg)


SESSION_KINDS = ("browser", "offer", "api", "whip")


class Session:
    """Wires one session: audio (mic, WHIP or queued speech) -> windows -> engine -> avatar video + synced voice."""

    def __init__(self, cfg: AppConfig, engine: ClipGenerator, reference_rgb: np.ndarray,
                 on_error: Callable[[str, str], Any] | None = None, kind: str = "browser") -> None:
        if kind not in SESSION_KINDS:
            raise ValueError(f"kind must be one of {SESSION_KINDS}, got {kind!r}")
        self.session_id = uuid.uuid4().hex[:12]
        self.kind = kind
        self._cfg = cfg
        self._engine = engine
        fmt = engine.stream_format.for_reference(reference_rgb.shape[:2])  # this session's frame size
        self.format = fmt
        self.clock = PlayoutClock(margin_s=cfg.server.playout_margin_s)
        frame_h, frame_w = fmt.frame_size
        self.reference_rgb = resize_rgb(reference_rgb, frame_h, frame_w)
        self.video_track = AvatarVideoTrack(self.clock, self.reference_rgb, fmt.fps)
        self.audio_track = SyncedAudioTrack(self.clock)
        self._cutter = AudioWindowCutter(fmt.sample_rate_hz, fmt.clip_samples, fmt.context_samples,
                                         fmt.lookahead_samples)
        self.output = SessionOutput(self.video_track, self.audio_track)  # every consumer subscribes here
        self.speech = SpeechInput(cfg.server.max_speech_s)
        self.has_mic = False
        self.viewers: dict[str, Any] = {}  # WHEP viewers by id (server/whep.py)
        self.recorder: Any = None  # server/recorder.SessionRecorder when recording
        self.rtmp: Any = None  # server/rtmp.RtmpPush when pushing
        self._cut: tuple[float, float] | None = None  # stream times [from, until) an interrupt silenced
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._tasks: set[asyncio.Task] = set()
        self._on_error = on_error
        self._closing: asyncio.Task | None = None
        self.closed = asyncio.Event()
        self.clips_played = 0
        self.clips_failed = 0
        self.started_s = time.monotonic()
        self.last_used_s = self.started_s  # the sessions API's idle timeout counts from here
        self._pc: RTCPeerConnection | None = None
        if kind != "api":
            self._pc = RTCPeerConnection(ice_configuration(cfg))
            self._watch_pc(self._pc)

    def _watch_pc(self, pc: RTCPeerConnection) -> None:
        @pc.on("connectionstatechange")
        async def on_connection_state() -> None:
            log.info("session %s: connection %s", self.session_id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                self.close_soon()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self.has_mic = True
                self._spawn(self._pump_audio(track), "audio-in")

    @property
    def connection_state(self) -> str:
        return self._pc.connectionState if self._pc is not None else "none"

    def spawn(self, coro: Any, name: str) -> None:
        """Run `coro` as one of this session's tasks: cancelled when the session closes."""
        self._spawn(coro, name)

    @property
    def interrupted_range_s(self) -> tuple[float, float] | None:
        """Stream times [from, until) the last interrupt silenced (its frames are not shown)."""
        return self._cut

    def start_feeder(self) -> None:
        """No microphone: the queued speech (silence between utterances) is this session's audio in."""
        self._spawn(self.speech.feed(self.push_audio), "speech-feed")

    def add_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        """`await closer()` runs when the session closes (viewers, recorder, RTMP push)."""
        self._closers.append(closer)

    def interrupt(self) -> float:
        """Drop the queued speech and cut what of it is already in the live path; returns seconds dropped.

        The cut starts at the stream time playing now: frames made for it are not shown (idle frames are)
        and its voice is silenced, up to the audio already fed; the silence fed after it plays on. So the
        avatar is back to idle within a frame, not after the clips already in work.
        """
        self.last_used_s = time.monotonic()
        dropped_s = self.speech.queue.clear()
        playing = self.clock.stream_time_at(time.monotonic())
        cut_from = playing if playing is not None else (self.clock.ready_until_s or 0.0)
        cut_until = self.speech.fed_until_s
        if cut_until > cut_from:
            self._cut = (cut_from, cut_until)
            self.video_track.drop_from(cut_from)
            self.audio_track.silence_from(cut_from)
        return dropped_s

    async def start(self, reference_image: np.ndarray, prompt: str, sample_steps: int | None = None) -> None:
        """Take a slot in the engine (EngineBusy if none is free) and prepare the avatar."""
        await self._engine.start(self.session_id, reference_image, prompt)
        if sample_steps is not None:
            self._engine.set_sample_steps(self.session_id, sample_steps)

    async def accept(self, sdp: str, sdp_type: str = "offer") -> RTCSessionDescription:
        """Answer the browser's offer: its mic comes in, the avatar and the delayed voice go out."""
        if sdp_type != "offer":
            raise OfferError(f"expected an SDP of type 'offer', got {sdp_type!r}")
        await self._set_remote_offer(sdp)
        kinds = [t.kind for t in self._pc.getTransceivers()]
        if "audio" not in kinds:
            raise OfferError("the offer has no audio track; add the microphone, or a recvonly audio "
                             "transceiver for a kiosk without one")
        if "video" not in kinds:
            raise OfferError("the offer cannot receive video; add a recvonly video transceiver")
        self._pc.addTrack(self.output.subscribe("audio"))
        self._pc.addTrack(self.output.subscribe("video"))
        if not offer_sends_audio(sdp):  # a kiosk without a microphone: the sessions API drives it
            self.start_feeder()
        return await self._answer()

    async def accept_ingest(self, sdp: str) -> RTCSessionDescription:
        """Answer a WHIP client's offer: its audio drives the avatar; its video is declined, nothing is sent."""
        await self._set_remote_offer(sdp)
        for transceiver in self._pc.getTransceivers():
            transceiver.direction = "recvonly" if transceiver.kind == "audio" else "inactive"
        return await self._answer()

    async def _set_remote_offer(self, sdp: str) -> None:
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:  # noqa: BLE001 - aiortc raises ValueError, AssertionError, KeyError, ... on bad SDP
            raise OfferError(f"the offer's SDP could not be parsed ({type(exc).__name__}: {exc})") from None

    async def _answer(self) -> RTCSessionDescription:
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
            self.push_audio(self.speech.mix(frame))

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
        if self._cut is not None and self._cut[0] <= part.t0 < self._cut[1]:
            # made for interrupted speech: its time plays idle frames and silence instead
            self.clock.note_no_video(part.t0, part.t0 + part.duration_s, time.monotonic())
            return
        self.clock.note_clip_ready(part.t0, part.t0 + part.duration_s, time.monotonic(),
                                   first_part=part.offset == 0)
        self.video_track.add_clip(part)
        if self._cut is not None and part.t0 < self._cut[0] < part.t0 + part.duration_s:
            self.video_track.drop_from(self._cut[0])
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
            for viewer in list(self.viewers.values()):  # WHEP viewers (server/whep.py) leave with the session
                await viewer.close()
            for closer in self._closers:
                try:
                    await closer()
                except Exception:
                    log.warning("session %s: an output did not close cleanly", self.session_id, exc_info=True)
            await self.output.close()
            await self._engine.stop(self.session_id)
            self.video_track.stop()
            self.audio_track.stop()
            if self._pc is not None:
                await close_peer_connection(self._pc, f"session {self.session_id}")
        finally:
            self.closed.set()
            log.info("session %s closed after %.1f s", self.session_id, time.monotonic() - self.started_s)


async def close_peer_connection(pc: RTCPeerConnection, who: str) -> None:
    """Close a peer connection; one that was half negotiated (a refused offer) has its transports stopped."""
    try:
        await pc.close()
    except Exception:
        log.warning("%s: peer connection did not close cleanly", who, exc_info=True)
        await _stop_transports(pc)


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
