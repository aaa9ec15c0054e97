"""What the client says to the avatar: a speech file paced in real time, or a live microphone.

Both are aiortc audio tracks of 20 ms, 48 kHz mono s16 frames with a sample-count pts (what a browser's
Opus sender gives the server). The microphone comes from PortAudio (`sounddevice`, imported only when a
microphone is used, so a machine without PortAudio can still send files) or from an input format of the
av (FFmpeg) build, named `FORMAT:DEVICE` (e.g. `alsa:default`).
"""
from __future__ import annotations

import asyncio
import fractions
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from client_cam.errors import EXIT_USAGE, ClientError

RATE_HZ = 48000
PTIME_S = 0.020
FRAME_SAMPLES = int(RATE_HZ * PTIME_S)
SKIP_AFTER_FRAMES = 50  # a file this far behind its real-time schedule (nobody sent it: a reconnect) skips ahead
MAX_QUEUED_FRAMES = 50  # 1 s of microphone audio; older frames are dropped if the loop falls behind


def pcm_frame(pcm: np.ndarray, index: int) -> av.AudioFrame:
    """One 20 ms frame (int16 mono) stamped with its place in the stream."""
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = RATE_HZ
    frame.pts = index * FRAME_SAMPLES
    frame.time_base = fractions.Fraction(1, RATE_HZ)
    return frame


def decode_mono_48k(container: av.container.InputContainer) -> Iterator[np.ndarray]:
    """Every audio frame of a container as int16 mono at 48 kHz, in order."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE_HZ)
    for frame in container.decode(audio=0):
        frame.pts = None  # resample by sample count: odd input timestamps must not add gaps
        for out in resampler.resample(frame):
            yield out.to_ndarray().reshape(-1)
    for out in resampler.resample(None):
        yield out.to_ndarray().reshape(-1)


class FileAudioTrack(MediaStreamTrack):
    """A speech file (anything av reads) played as a microphone in real time, then silence.

    Decoded as it plays, so memory stays flat for any length. `started_s` is the monotonic time the
    first sample was handed to the sender and `ended_s` when the file's last sample was.
    """

    kind = "audio"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            self._container = av.open(str(path))
            if not self._container.streams.audio:
                raise ClientError(f"--audio {path}: the file has no audio stream", EXIT_USAGE)
        except (av.error.FFmpegError, OSError) as exc:
            raise ClientError(f"--audio {path}: cannot read it as audio ({exc})", EXIT_USAGE) from None
        self._chunks = decode_mono_48k(self._container)
        self._pending = np.zeros(0, dtype=np.int16)
        self._index = -1
        self.started_s: float | None = None
        self.ended_s: float | None = None

    def _next_pcm(self) -> np.ndarray:
        while len(self._pending) < FRAME_SAMPLES and self.ended_s is None:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.ended_s = time.monotonic()
                self._container.close()
                break
            self._pending = np.concatenate([self._pending, chunk])
        pcm = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        take = self._pending[:FRAME_SAMPLES]
        pcm[:len(take)] = take
        self._pending = self._pending[len(take):]
        return pcm

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        self._index += 1
        if self._index == 0:
            self.started_s = time.monotonic()
        else:
            due = int((time.monotonic() - self.started_s) / PTIME_S)
            while self._index < due - SKIP_AFTER_FRAMES:  # nobody listened (a reconnect): the speech went on
                self._next_pcm()
                self._index += 1
            await asyncio.sleep(max(0.0, self.started_s + self._index * PTIME_S - time.monotonic()))
        return pcm_frame(self._next_pcm(), self._index)

    def stop(self) -> None:
        super().stop()
        self._chunks.close()
        self._container.close()


class MicrophoneTrack(MediaStreamTrack):
    """A live microphone: blocks of 20 ms from a capture thread (PortAudio's or av's), handed to the sender."""

    kind = "audio"

    def __init__(self, name: str | None) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._queue: deque[np.ndarray] = deque(maxlen=MAX_QUEUED_FRAMES)
        self._ready = asyncio.Event()
        self._index = -1
        self._stop = threading.Event()
        self._pending = np.zeros(0, dtype=np.int16)
        self._av_thread: threading.Thread | None = None
        self._stream = None
        fmt, sep, device = (name or "").partition(":")
        if sep and fmt in av.formats_available:
            self._open_av_input(fmt, device or "default")
        else:
            self._open_portaudio(name)

    # ------------------------------------------------------------ capture (another thread)

    def _deliver(self, pcm: np.ndarray) -> None:
        """Called from the capture thread: cut into 20 ms frames and wake the sender."""
        self._pending = np.concatenate([self._pending, pcm.astype(np.int16).reshape(-1)])
        while len(self._pending) >= FRAME_SAMPLES:
            self._queue.append(self._pending[:FRAME_SAMPLES].copy())
            self._pending = self._pending[FRAME_SAMPLES:]
            self._loop.call_soon_threadsafe(self._ready.set)

    def _open_portaudio(self, name: str | None) -> None:
        sd = import_sounddevice()
        device = None if name is None else find_input_device(sd, name)

        def callback(indata: np.ndarray, frames: int, time_info: object, status: object) -> None:
            self._deliver(indata[:, 0])

        try:
            self._stream = sd.InputStream(device=device, channels=1, samplerate=RATE_HZ, dtype="int16",
                                          blocksize=FRAME_SAMPLES, callback=callback)
            self._stream.start()
        except sd.PortAudioError as exc:
            raise ClientError(f"--mic: cannot open the microphone {name or '(default)'}: {exc}; "
                              "see --list-devices") from None

    def _open_av_input(self, fmt: str, device: str) -> None:
        try:
            container = av.open(device, format=fmt, mode="r")
        except (av.error.FFmpegError, OSError) as exc:
            raise ClientError(f"--mic {fmt}:{device}: cannot open it ({exc})") from None

        def capture() -> None:
            try:
                for pcm in decode_mono_48k(container):
                    if self._stop.is_set():
                        break
                    self._deliver(pcm)
            finally:
                container.close()

        self._av_thread = threading.Thread(target=capture, name="mic-capture", daemon=True)
        self._av_thread.start()

    # ------------------------------------------------------------ sending (the event loop)

    async def recv(self) -> av.AudioFrame:
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        self._index += 1
        return pcm_frame(self._queue.popleft(), self._index)

    def stop(self) -> None:
        super().stop()
        self._stop.set()
        self._ready.set()
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()


def import_sounddevice():
    """sounddevice needs the PortAudio library; only the live microphone and named output devices use it."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:
        raise ClientError(f"PortAudio is not available ({exc}); install it (Debian/Ubuntu: sudo apt install "
                          "libportaudio2) or send a file with --audio FILE") from None
    return sounddevice


def find_input_device(sd, name: str) -> int:
    """A device index from its number or a part of its name (as --list-devices shows them)."""
    return _find_device(sd, name, "max_input_channels", "--mic")


def find_output_device(sd, name: str) -> int:
    return _find_device(sd, name, "max_output_channels", "--virtual-mic")


def _find_device(sd, name: str, channels_key: str, flag: str) -> int:
    devices = sd.query_devices()
    if name.isdigit() and int(name) < len(devices) and devices[int(name)][channels_key] > 0:
        return int(name)
    matches = [i for i, d in enumerate(devices) if name.lower() in d["name"].lower() and d[channels_key] > 0]
    if not matches:
        raise ClientError(f"{flag} {name!r}: no such audio device; python -m client_cam --list-devices shows them")
    return matches[0]


def list_devices() -> str:
    """The audio devices PortAudio sees, for --mic (inputs) and --virtual-mic on Windows/macOS (outputs)."""
    sd = import_sounddevice()
    lines = []
    for index, device in enumerate(sd.query_devices()):
        kinds = [k for k, key in (("in", "max_input_channels"), ("out", "max_output_channels")) if device[key] > 0]
        lines.append(f"{index:3d}  {'/'.join(kinds):6s} {device['name']}")
    formats = sorted(f for f in ("alsa", "pulse", "avfoundation", "dshow") if f in av.formats_available)
    if formats:
        lines.append("also usable as --mic FORMAT:DEVICE: " + ", ".join(formats))
    return "\n".join(lines) if lines else "no audio devices found"
