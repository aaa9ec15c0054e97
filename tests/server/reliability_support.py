"""Shared pieces of the reliability tests: a small real-model config, a JSON websocket client, offers,
mic frames, and the process counts (RSS, threads, fds) the leak checks compare."""
from __future__ import annotations

import asyncio
import ctypes
import fractions
import gc
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import psutil
import websockets
from aiortc import RTCPeerConnection

from model.config import AppConfig, load_config
from model.io_types import AudioWindow
from server.engine import ModelEngine
from tests.server.conftest import BARE_DECODE, RunningServer, start_server

MIC_RATE_HZ = 48000
MIC_PTIME_S = 0.020


def small_cfg(**overrides: Any) -> AppConfig:
    """The tiny model at the smallest frame size it takes (64*64), one torch thread: cheap on 2 cores."""
    base = {"video.size": "64*64", "runtime.num_threads": 1, "server.stats_interval_s": 0.5, **BARE_DECODE}
    base.update(overrides)
    return load_config(None, base)


@asynccontextmanager
async def running_server(cfg: AppConfig, engine: Any = None) -> AsyncIterator[tuple[RunningServer, Any]]:
    """A loaded real engine (unless one is given) behind the real app on a free loopback port."""
    own = engine is None
    if own:
        engine = ModelEngine(cfg)
        await engine.load()
    server, runner = await start_server(cfg, engine)
    try:
        yield server, engine
    finally:
        await runner.cleanup()
        if own:
            await engine.close()


class JsonSocket:
    """A websocket client speaking the page's JSON messages; replies are read one at a time."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> JsonSocket:
        return cls(await websockets.connect(url, max_size=2**24, **kwargs))

    async def send(self, message: Any) -> None:
        await self.ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))

    async def receive(self, timeout_s: float = 30.0, skip_stats: bool = True) -> dict:
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), timeout_s))
            if not (skip_stats and message.get("type") == "stats"):
                return message

    async def request(self, message: Any, timeout_s: float = 30.0) -> dict:
        await self.send(message)
        return await self.receive(timeout_s)

    async def close(self) -> None:
        await self.ws.close()


async def offer_sdp(audio: bool = True, video: bool = True) -> tuple[RTCPeerConnection, str]:
    """A real aiortc offer (mic sendrecv, video recvonly); the caller closes the returned pc."""
    pc = RTCPeerConnection()
    if audio:
        pc.addTransceiver("audio", direction="sendrecv")
    if video:
        pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def mic_frames(seconds: float, start_s: float = 0.0, seed: int = 0) -> list[av.AudioFrame]:
    """Speech-band noise as the 20 ms 48 kHz mono frames aiortc hands a session, pts on the RTP clock."""
    n = int(MIC_PTIME_S * MIC_RATE_HZ)
    count = round(seconds / MIC_PTIME_S)
    rng = np.random.default_rng(seed)
    first = round(start_s * MIC_RATE_HZ)
    frames = []
    for i in range(count):
        pcm = (rng.standard_normal(n) * 3000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = MIC_RATE_HZ
        frame.pts = first + i * n
        frame.time_base = fractions.Fraction(1, MIC_RATE_HZ)
        frames.append(frame)
    return frames


@dataclass(frozen=True)
class ProcessCounts:
    """What a leak would grow: resident memory, threads, open file descriptors, asyncio tasks."""

    rss_mb: float
    threads: int  # native threads of the process (torch, codecs, ours), asyncio's executor pool excluded
    fds: int
    tasks: int

    def __str__(self) -> str:
        return f"rss {self.rss_mb:.1f} MB, {self.threads} threads, {self.fds} fds, {self.tasks} tasks"


def release_free_heap() -> None:
    """Hand glibc's freed-but-kept heap pages back to the OS, so RSS measures live memory, not fragmentation."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS then includes the allocator's cache, still bounded


async def settle_and_count(settle_s: float = 0.5) -> ProcessCounts:
    """Let closing transports finish, collect garbage, return freed heap, then count."""
    await asyncio.sleep(settle_s)
    gc.collect()
    await asyncio.sleep(0)
    release_free_heap()
    proc = psutil.Process()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    # asyncio's default executor keeps up to a handful of idle threads once used; they are a pool, not a leak
    pool = sum(1 for t in threading.enumerate() if t.name.startswith("asyncio_"))
    return ProcessCounts(rss_mb=proc.memory_info().rss / 2**20, threads=proc.num_threads() - pool,
                         fds=proc.num_fds(), tasks=len(tasks))


def session_by_id(server: RunningServer, session_id: str) -> Any:
    from server.signaling import STATE_KEY

    for session in server.app[STATE_KEY].sessions:
        if session.session_id == session_id:
            return session
    raise AssertionError(f"no live session {session_id!r} on the server")


def server_state(server: RunningServer) -> Any:
    from server.signaling import STATE_KEY

    return server.app[STATE_KEY]


def noise_window(engine: ModelEngine, clip_index: int) -> AudioWindow:
    """Window `clip_index` of quiet noise in the engine's format, as the window cutter would hand it over."""
    fmt = engine.stream_format
    rng = np.random.default_rng(clip_index)
    samples = (0.1 * rng.standard_normal(fmt.context_samples + fmt.clip_samples)).astype(np.float32)
    return AudioWindow(samples, fmt.context_samples, clip_index * fmt.clip_samples / fmt.sample_rate_hz, clip_index)
