"""`run_server.py --virtualcam`: a session's avatar on this machine's virtual camera and microphone.

For a GPU desktop that is also the machine in the call. The first session to start (a page's or an API
session) is published: it subscribes to the session's output like any viewer, so it gets the very frames
and voice the viewer gets, and writes them through client_cam's sinks (the same camera, null sink or
virtual cable, the same stall filler) that `python -m client_cam` uses on a laptop. When that session
ends the camera keeps showing its last frame, breathing, until the next session starts.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import sys

from aiohttp import web
from aiortc.mediastreams import MediaStreamError

from client_cam.camera_sink import check_camera
from client_cam.errors import ClientError
from client_cam.mic_sink import default_virtual_mic, open_virtual_mic
from client_cam.output import AvatarOutput
from model.config import AppConfig, is_off
from server.signaling import STATE_KEY, ServerState

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the publisher looks for a session to show when it shows none


def camera_device(cfg: AppConfig) -> tuple[bool, str | None]:
    """(camera wanted, its device or None for the first v4l2loopback device)."""
    device = cfg.server.virtualcam_device
    return not is_off(device), device or None


def mic_name(cfg: AppConfig) -> str | None:
    name = cfg.server.virtualcam_mic
    return None if is_off(name) else (default_virtual_mic() if name == "auto" else name)


def check_virtualcam(cfg: AppConfig) -> None:
    """Before the model loads: the camera device exists and the microphone's tools are there (ClientError)."""
    use_camera, device = camera_device(cfg)
    if use_camera:
        check_camera(device, instead="or publish the voice only with --virtualcam_device off")
    if mic_name(cfg) and sys.platform.startswith("linux"):
        for tool in ("pactl", "pacat"):
            if shutil.which(tool) is None:
                raise ClientError(f"--virtualcam: the virtual microphone needs {tool} (Debian/Ubuntu: sudo apt "
                                  "install pulseaudio-utils), or pass --virtualcam_mic off")


class VirtualCamPublisher:
    """Shows one session at a time on the virtual camera and microphone."""

    def __init__(self, cfg: AppConfig) -> None:
        use_camera, device = camera_device(cfg)
        self._mic_name = mic_name(cfg)
        self.output = AvatarOutput(device, use_camera, None, on_fatal=self._sink_failed)
        self.session_id: str | None = None  # the session shown now
        self.sessions_shown = 0
        self._task: asyncio.Task | None = None

    def _sink_failed(self, exc: BaseException) -> None:
        log.error("virtual camera: %s; the avatar is no longer published", exc)
        if self._task is not None:
            self._task.cancel()

    async def start(self, state: ServerState) -> None:
        if self._mic_name:
            mic = open_virtual_mic(self._mic_name)
            try:
                await mic.start()
                self.output.mic = mic
            except ClientError as exc:
                log.error("virtual microphone: %s; publishing the camera only", exc)
        self._task = asyncio.get_running_loop().create_task(self._run(state), name="virtualcam")

    async def _run(self, state: ServerState) -> None:
        while True:
            session = first_session(state)
            if session is None:
                await asyncio.sleep(POLL_S)
                continue
            await self._show(session)

    async def _show(self, session) -> None:
        """Pump one session's output into the sinks until it ends."""
        self.session_id = session.session_id
        self.sessions_shown += 1
        log.info("virtual camera: showing session %s", session.session_id)
        self.output.new_connection()
        video, audio = session.output.subscribe("video"), session.output.subscribe("audio")
        pumps = [asyncio.create_task(self._pump_video(video)), asyncio.create_task(self._pump_audio(audio))]
        closed = asyncio.create_task(session.closed.wait())
        try:
            await asyncio.wait([pumps[0], closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*pumps, closed):
                task.cancel()
            await asyncio.gather(*pumps, closed, return_exceptions=True)
            video.stop()
            audio.stop()
            self.session_id = None
            while not session.closed.is_set():  # the video ended first: wait for the session to be gone
                await asyncio.sleep(POLL_S)

    async def _pump_video(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.output.on_video(frame.to_ndarray(format="rgb24"), frame.pts, float(frame.time_base))

    async def _pump_audio(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.output.on_audio(frame.to_ndarray().reshape(-1), float(frame.pts * frame.time_base))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.output.close()


def first_session(state: ServerState):
    """The longest-running live session, or None."""
    live = [s for s in state.sessions if not s.closed.is_set()]
    return min(live, key=lambda s: s.started_s) if live else None


PUBLISHER_KEY = web.AppKey("virtualcam", VirtualCamPublisher)


def add_virtualcam(app: web.Application) -> None:
    """Publish the first session while the app runs; everything set up is removed at shutdown."""

    async def start(app: web.Application) -> None:
        publisher = VirtualCamPublisher(app[STATE_KEY].cfg)
        app[PUBLISHER_KEY] = publisher
        await publisher.start(app[STATE_KEY])

    async def stop(app: web.Application) -> None:
        await app[PUBLISHER_KEY].close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
