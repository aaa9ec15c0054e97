"""A loopback WebRTC client for the server tests: real SDP/ICE/DTLS/SRTP through the real `/ws`.

It sends a speech recording as its microphone and keeps every video and audio frame it gets back,
with the wall time its first RTP packet arrived (so jitter-buffer hold times do not bias A/V timing).
"""
from __future__ import annotations

import asyncio
import fractions
import json
import time
from dataclasses import dataclass, field

import av
import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpreceiver import RTCRtpReceiver

OPUS_RATE_HZ = 48000
PTIME_S = 0.020


class SpeechTrack(MediaStreamTrack):
    """A microphone that plays `pcm` (48 kHz mono int16) in real time, then silence."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray) -> None:
        super().__init__()
        self._pcm = pcm.astype(np.int16)
        self._n = int(PTIME_S * OPUS_RATE_HZ)
        self._index = -1
        self._start_s = 0.0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        self._index += 1
        if self._index == 0:
            self._start_s = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._start_s + self._index * PTIME_S - time.monotonic()))
        chunk = np.zeros(self._n, dtype=np.int16)
        part = self._pcm[self._index * self._n:(self._index + 1) * self._n]
        chunk[:len(part)] = part
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OPUS_RATE_HZ
        frame.pts = self._index * self._n
        frame.time_base = fractions.Fraction(1, OPUS_RATE_HZ)
        return frame


class RtpArrivalLog:
    """Records when the first packet of each RTP timestamp reached each receiver (monotonic seconds)."""

    def __init__(self) -> None:
        self.arrivals: dict[int, dict[int, float]] = {}  # id(receiver) -> rtp timestamp -> arrival
        self.first_timestamp: dict[int, int] = {}
        self._original = RTCRtpReceiver._handle_rtp_packet

    def install(self) -> None:
        original, log = self._original, self

        async def handle(receiver, packet, arrival_time_ms):
            now = time.monotonic()
            per_receiver = log.arrivals.setdefault(id(receiver), {})
            log.first_timestamp.setdefault(id(receiver), packet.timestamp)
            per_receiver.setdefault(packet.timestamp, now)
            return await original(receiver, packet, arrival_time_ms)

        RTCRtpReceiver._handle_rtp_packet = handle

    def uninstall(self) -> None:
        RTCRtpReceiver._handle_rtp_packet = self._original

    def arrival_of(self, receiver: RTCRtpReceiver, pts: int) -> float | None:
        """aiortc's frame pts is the RTP timestamp minus the stream's first one."""
        key = id(receiver)
        if key not in self.first_timestamp:
            return None
        return self.arrivals[key].get((self.first_timestamp[key] + pts) % (1 << 32))


@dataclass
class ReceivedVideo:
    pts: int
    time_base: fractions.Fraction
    rgb: np.ndarray
    arrival_s: float


@dataclass
class ReceivedAudio:
    pts: int
    pcm: np.ndarray  # int16 mono at 48 kHz
    arrival_s: float


@dataclass
class LoopbackClient:
    """Connects to `ws_url`, sends `speech`, collects what comes back."""

    ws_url: str
    speech_pcm: np.ndarray
    config: dict = field(default_factory=dict)
    video: list[ReceivedVideo] = field(default_factory=list)
    audio: list[ReceivedAudio] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    connected_s: float | None = None
    answer_timeout_s: float = 30.0  # longer for an offer that may wait in the server's line

    def __post_init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.arrivals = RtpArrivalLog()
        self._tasks: list[asyncio.Task] = []
        self.answered = asyncio.Event()
        self.ws = None

    async def connect(self) -> None:
        self.arrivals.install()
        self.mic = SpeechTrack(self.speech_pcm)
        self.pc.addTrack(self.mic)
        self.pc.addTransceiver("video", direction="recvonly")

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track)
            reader = self._read_video if track.kind == "video" else self._read_audio
            self._tasks.append(asyncio.create_task(reader(track, receiver)))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.ws = await websockets.connect(self.ws_url, max_size=2**22)
        self._tasks.append(asyncio.create_task(self._read_messages()))
        await self.send({"type": "offer", "sdp": self.pc.localDescription.sdp, "config": self.config})
        await asyncio.wait_for(self.answered.wait(), timeout=self.answer_timeout_s)

    async def send(self, message: dict) -> None:
        await self.ws.send(json.dumps(message))

    async def _read_messages(self) -> None:
        async for text in self.ws:
            message = json.loads(text)
            message["received_s"] = time.monotonic()
            self.messages.append(message)
            if message["type"] == "answer":
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=message["sdp"], type="answer"))
                self.connected_s = time.monotonic()
                self.answered.set()
            elif message["type"] == "error" and not self.answered.is_set():
                self.answered.set()

    async def _read_video(self, track: MediaStreamTrack, receiver: RTCRtpReceiver) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            arrival = self.arrivals.arrival_of(receiver, frame.pts) or time.monotonic()
            self.video.append(ReceivedVideo(frame.pts, frame.time_base, frame.to_ndarray(format="rgb24"), arrival))

    async def _read_audio(self, track: MediaStreamTrack, receiver: RTCRtpReceiver) -> None:
        mono = av.AudioResampler(format="s16", layout="mono", rate=OPUS_RATE_HZ)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            arrival = self.arrivals.arrival_of(receiver, frame.pts) or time.monotonic()
            for out in mono.resample(frame):
                self.audio.append(ReceivedAudio(frame.pts, out.to_ndarray().reshape(-1).copy(), arrival))

    def stats(self) -> list[dict]:
        return [m for m in self.messages if m["type"] == "stats"]

    def errors(self) -> list[dict]:
        return [m for m in self.messages if m["type"] == "error"]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()
        self.arrivals.uninstall()


def speech_played(client: LoopbackClient, speech_s: float, elapsed_s: float) -> bool:
    """True once the last of the speech has had time to come back (its latency plus a second)."""
    stats = client.stats()
    if not stats or stats[-1]["latency_ms"] is None:
        return False  # no clip has played yet
    return elapsed_s > speech_s + stats[-1]["latency_ms"] / 1000 + 1.0


async def run_client(server, speech_pcm: np.ndarray, until_s: float, during=None, done=None,
                     config: dict | None = None) -> LoopbackClient:
    """Stream the speech (48 kHz) and keep receiving until `done(client, elapsed_s)` (default: the speech played)."""
    client = LoopbackClient(server.ws_url, speech_pcm, config=config or {})
    speech_s = len(speech_pcm) / 48000
    done = done or (lambda c, elapsed: speech_played(c, speech_s, elapsed))
    try:
        await client.connect()
        assert not client.errors(), client.errors()
        started = time.monotonic()
        while time.monotonic() - started < until_s:
            await asyncio.sleep(0.25)
            if during is not None:
                await during(client)
            if done(client, time.monotonic() - started):
                break
    finally:
        await client.close()
    return client


class WhepClient(LoopbackClient):
    """A WHEP viewer (`POST {url}` with an SDP offer): receives the session's video and voice, sends nothing.

    Clients share `RtpArrivalLog`'s patch in a chain: close them in the reverse order of `connect`.
    """

    def __init__(self, whep_url: str, headers: dict | None = None) -> None:
        super().__init__(whep_url, np.zeros(0, np.int16))
        self.whep_url = whep_url
        self.headers = headers or {}
        self.location: str | None = None

    async def connect(self) -> None:
        import aiohttp

        self.arrivals.install()
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track)
            reader = self._read_video if track.kind == "video" else self._read_audio
            self._tasks.append(asyncio.create_task(reader(track, receiver)))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with aiohttp.ClientSession() as http, http.post(
                self.whep_url, data=self.pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp", **self.headers}) as response:
            body = await response.text()
            assert response.status == 201, (response.status, body)
            self.location = response.headers["Location"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        self.connected_s = time.monotonic()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()
        self.arrivals.uninstall()
