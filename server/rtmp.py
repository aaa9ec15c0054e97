"""RTMP push (`rtmp` on create, `--rtmp URL` for the first session): H.264 + AAC in FLV with av.

The push subscribes to the session's output like any viewer. When the ingest drops (or is not up yet) it
reconnects with back-off (1, 2, 4 ... 30 s), for as long as the session lives; what the session shows
meanwhile is not sent.
"""
from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

from server.av_writer import AvContainerWriter, OutputRecorderTask

log = logging.getLogger(__name__)

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
MAX_URL_CHARS = 2048
LIVE_FOR_RESET_S = 10.0  # a connection that lasted this long starts the back-off over


class RtmpUrlError(ValueError):
    """The RTMP URL cannot be pushed to; the message says why."""


def check_rtmp_url(url: object) -> str:
    """An rtmp:// or rtmps:// URL with a host, or RtmpUrlError."""
    if not isinstance(url, str) or not url:
        raise RtmpUrlError("rtmp must be a URL string such as rtmp://host/live/streamkey")
    if len(url) > MAX_URL_CHARS or any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise RtmpUrlError(f"rtmp URL must be at most {MAX_URL_CHARS} characters without spaces or control "
                           "characters")
    parts = urlsplit(url)
    if parts.scheme not in ("rtmp", "rtmps") or not parts.hostname:
        raise RtmpUrlError(f"rtmp must be an rtmp:// or rtmps:// URL with a host (rtmp://host/live/streamkey), "
                           f"got {url[:100]!r}")
    return url


def redact(url: str) -> str:
    """The URL without its stream key, for logs and listings."""
    parts = urlsplit(url)
    path = parts.path.rsplit("/", 1)[0] + "/…" if parts.path.count("/") > 1 else parts.path
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{path}"


class RtmpPush:
    """Pushes one session's output to `url` until the session closes, reconnecting with back-off."""

    def __init__(self, session, url: str) -> None:
        self.url = check_rtmp_url(url)
        fmt = session.format
        gop_frames = max(1, round(fmt.fps))  # a keyframe a second: players joining mid-stream start fast
        self._task = OutputRecorderTask(
            session.output,
            lambda: AvContainerWriter(self.url, "flv", fmt.fps, fmt.frame_size, gop_frames=gop_frames,
                                      options={"rw_timeout": "10000000"}),
            name=f"rtmp-{session.session_id}")
        self._session_id = session.session_id
        self.state = "connecting"
        self.connections = 0
        self.last_error: str | None = None
        self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"rtmp-{session.session_id}")
        session.add_closer(self.stop)

    def _opened(self) -> None:
        self.state = "live"
        self.connections += 1
        log.info("session %s: pushing to %s", self._session_id, redact(self.url))

    async def _run(self) -> None:
        attempt = 0
        while True:
            started_s = time.monotonic()
            try:
                await self._task.run(on_open=self._opened)
                return  # the session's output ended
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the ingest refused, dropped or is not up: try again later
                self.last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - started_s > LIVE_FOR_RESET_S:
                attempt = 0
            wait_s = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
            attempt += 1
            self.state = "retrying"
            log.warning("session %s: RTMP push to %s failed (%s); retrying in %g s", self._session_id,
                        redact(self.url), self.last_error, wait_s)
            await asyncio.sleep(wait_s)
            self.state = "connecting"

    async def stop(self) -> None:
        self._runner.cancel()
        await asyncio.gather(self._runner, return_exceptions=True)
        self._task.shutdown()
        self.state = "stopped"

    def describe(self) -> dict:
        return {"url": redact(self.url), "state": self.state, "connections": self.connections,
                "last_error": self.last_error}
