"""The avatar's voice into a virtual microphone that call apps can pick.

Linux: a PulseAudio (or PipeWire-pulse) null sink named e.g. `LiveAvatar`, created with pactl when absent
and removed on exit, plus a source remapped from its monitor (apps that hide monitors still list
"LiveAvatar"); the voice is played into the sink by pacat. Windows and macOS: an output device of a
virtual audio cable (VB-Cable's "CABLE Input", BlackHole) through PortAudio; the call app picks its
other end ("CABLE Output", "BlackHole") as its microphone.
"""
from __future__ import annotations

import asyncio
import shutil
import sys
import threading
from collections import deque

import numpy as np

from client_cam.errors import ClientError
from client_cam.media_in import RATE_HZ, find_output_device, import_sounddevice

PACAT_LATENCY_MS = 60  # what the sound server buffers ahead: a busy client stalls shorter than this
DEFAULT_DEVICE = {"win32": "CABLE Input", "darwin": "BlackHole"}


def default_virtual_mic() -> str:
    """The null sink's name on Linux, the virtual cable's playback side elsewhere."""
    return DEFAULT_DEVICE.get(sys.platform, "LiveAvatar")


async def _run(*args: str) -> str:
    """Run a pactl command; its stdout, or a ClientError with its stderr."""
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        detail = " ".join(err.decode().split()) or f"exit code {proc.returncode}"  # one line, however pactl wraps
        raise ClientError(f"virtual microphone: {' '.join(args[:2])} failed ({detail}); is PulseAudio or "
                          "PipeWire's pulse server running? Or pass --virtual-mic off")
    return out.decode()


class PulseNullSinkMic:
    """A null sink `name` (and a source `name`_mic made from its monitor) fed with the voice through pacat."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source_name = f"{name}_mic"
        self._modules: list[str] = []  # modules this process loaded, unloaded on close
        self._pacat: asyncio.subprocess.Process | None = None
        self.samples_written = 0

    async def start(self) -> None:
        for tool in ("pactl", "pacat"):
            if shutil.which(tool) is None:
                raise ClientError(f"the virtual microphone needs {tool} (Debian/Ubuntu: sudo apt install "
                                  "pulseaudio-utils, works with PipeWire too), or pass --virtual-mic off")
        sinks = [line.split("\t")[1] for line in (await _run("pactl", "list", "short", "sinks")).splitlines()
                 if "\t" in line]
        if self.name not in sinks:
            self._modules.append((await _run(
                "pactl", "load-module", "module-null-sink", f"sink_name={self.name}",
                f"sink_properties=device.description={self.name}-voice")).strip())
            self._modules.append((await _run(
                "pactl", "load-module", "module-remap-source", f"master={self.name}.monitor",
                f"source_name={self.source_name}", f"source_properties=device.description={self.name}")).strip())
        self._pacat = await asyncio.create_subprocess_exec(
            "pacat", "--playback", f"--device={self.name}", "--format=s16le", f"--rate={RATE_HZ}", "--channels=1",
            f"--latency-msec={PACAT_LATENCY_MS}", "--client-name=LiveAvatar", "--stream-name=avatar voice",
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)

    def write(self, pcm: np.ndarray) -> None:
        """int16 mono 48 kHz samples, played as they come."""
        if self._pacat is None or self._pacat.returncode is not None or self._pacat.stdin.is_closing():
            return
        self._pacat.stdin.write(pcm.astype("<i2").tobytes())
        self.samples_written += len(pcm)

    async def close(self) -> None:
        """Stop playing and remove what this process added, newest first, so the sound server is as it was."""
        if self._pacat is not None:
            if self._pacat.returncode is None:
                self._pacat.stdin.close()
                try:
                    await asyncio.wait_for(self._pacat.wait(), 2.0)
                except TimeoutError:
                    self._pacat.kill()
                    await self._pacat.wait()
            self._pacat = None
        for module in reversed(self._modules):
            try:
                await _run("pactl", "unload-module", module)
            except ClientError:
                pass  # the sound server went away: nothing left to clean
        self._modules.clear()


class DeviceOutputMic:
    """A named output device (VB-Cable, BlackHole) through PortAudio, fed from a small queue."""

    def __init__(self, name: str, max_buffer_s: float = 0.5) -> None:
        self.name = name
        self._queue: deque[np.ndarray] = deque()
        self._queued = 0
        self._max_queued = int(max_buffer_s * RATE_HZ)
        self._lock = threading.Lock()  # the queue is filled on the event loop and drained by PortAudio's thread
        self._stream = None
        self.samples_written = 0

    async def start(self) -> None:
        sd = import_sounddevice()
        device = find_output_device(sd, self.name)
        try:
            self._stream = sd.OutputStream(device=device, channels=1, samplerate=RATE_HZ, dtype="int16",
                                           callback=self._fill)
            self._stream.start()
        except sd.PortAudioError as exc:
            raise ClientError(f"--virtual-mic {self.name!r}: cannot play to it ({exc})") from None

    def _fill(self, outdata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        out = outdata[:, 0]
        out[:] = 0
        with self._lock:
            self._drain_into(out, frames)

    def _drain_into(self, out: np.ndarray, frames: int) -> None:
        filled = 0
        while filled < frames and self._queue:
            chunk = self._queue[0]
            take = min(frames - filled, len(chunk))
            out[filled:filled + take] = chunk[:take]
            filled += take
            if take == len(chunk):
                self._queue.popleft()
            else:
                self._queue[0] = chunk[take:]
            self._queued -= take

    def write(self, pcm: np.ndarray) -> None:
        with self._lock:
            self._queue.append(pcm.astype(np.int16))
            self._queued += len(pcm)
            while self._queued > self._max_queued and len(self._queue) > 1:  # the device stalled: stay live
                self._queued -= len(self._queue.popleft())
        self.samples_written += len(pcm)

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None


def open_virtual_mic(name: str) -> PulseNullSinkMic | DeviceOutputMic:
    """The platform's kind of virtual microphone (not started yet)."""
    if sys.platform.startswith("linux"):
        return PulseNullSinkMic(name)
    return DeviceOutputMic(name)
