"""Recording (`record: true`): a session's output as a fragmented MP4, written clip by clip.

One fragment per clip (a keyframe every clip's worth of frames, `frag_keyframe+empty_moov`), so the file on
disk is playable up to its last whole fragment even if the server dies mid-session; `GET
/sessions/{id}/recording` serves it, during the session or after.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from server.av_writer import AvContainerWriter, OutputRecorderTask

log = logging.getLogger(__name__)

FRAGMENTED_MP4 = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}


class SessionRecorder:
    """Writes `{directory}/{session_id}.mp4` from the session's output until the session closes."""

    def __init__(self, session, directory: str | Path) -> None:
        self.path = Path(directory).resolve() / f"{session.session_id}.mp4"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fmt = session.format
        self._task = OutputRecorderTask(
            session.output,
            lambda: AvContainerWriter(str(self.path), "mp4", fmt.fps, fmt.frame_size,
                                      gop_frames=fmt.frames_per_clip, options=FRAGMENTED_MP4),
            name=f"record-{session.session_id}")
        self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"record-{session.session_id}")
        self.error: str | None = None
        session.add_closer(self.stop)
        log.info("session %s: recording to %s", session.session_id, self.path)

    async def _run(self) -> None:
        try:
            await self._task.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a full disk, an unwritable folder: the session goes on unrecorded
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("recording %s failed: %s", self.path, self.error)

    async def stop(self) -> None:
        """Finish the file (its last fragment) and release the writer."""
        self._runner.cancel()
        await asyncio.gather(self._runner, return_exceptions=True)
        self._task.shutdown()

    def describe(self) -> dict:
        return {"path": str(self.path), "error": self.error}
