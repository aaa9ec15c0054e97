"""Speech a bot gives a session (`POST /sessions/{id}/speak`): decoded, queued, and fed into the live path.

The speech enters exactly where a microphone's audio does (`Session.push_audio`: the window cutter, the
engine, the playout clock, the returned voice), so lips and voice stay in sync the same way. A session
without a microphone gets a feeder: 20 ms frames in real time, the queued speech or silence between
utterances (the model keeps drawing the avatar, silent, so speech starts on a steady stream). A session
with one (a browser, a WHIP client) has the queued speech mixed into its microphone frames instead, on
the microphone's own clock.
"""
from __future__ import annotations

import asyncio
import fractions
import io
import time
from collections import deque
from collections.abc import Callable

import av
import numpy as np

RATE_HZ = 48000
FRAME_SAMPLES = 960  # 20 ms, what WebRTC hands a session
FRAME_S = FRAME_SAMPLES / RATE_HZ
MAX_FEED_LAG_S = 0.5  # further behind than this (a stalled loop), the feeder skips ahead instead of bursting


class SpeechError(ValueError):
    """Speech that cannot be used; `code` is machine-readable, the message says what was wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def decode_speech(data: bytes, max_s: float) -> np.ndarray:
    """Any audio file av reads (wav, mp3, ogg/opus, m4a, flac...) -> int16 mono at 48 kHz, at most `max_s` long."""
    if not data:
        raise SpeechError("empty_body", "the request body is empty; send an audio file (wav, mp3, ogg, m4a, flac)")
    chunks: list[np.ndarray] = []
    total = 0
    limit = int(max_s * RATE_HZ)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise SpeechError("bad_audio", "the body holds no audio stream; send an audio file "
                                               "(wav, mp3, ogg/opus, m4a, flac)")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE_HZ)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += out.samples
                if total > limit:
                    raise SpeechError("speech_too_long", f"the speech is longer than {max_s:g} s "
                                                         "(--server.max_speech_s); send it in parts")
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except SpeechError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise SpeechError("bad_audio", f"the body is not an audio file av can decode ({exc}); send wav, mp3, "
                                       "ogg/opus, m4a or flac") from None
    pcm = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)
    if not len(pcm):
        raise SpeechError("bad_audio", "the audio file decodes to no samples; send speech")
    return pcm


class SpeechQueue:
    """Utterances waiting to be spoken (48 kHz mono int16), taken sample by sample as the stream advances."""

    def __init__(self, max_queued_s: float) -> None:
        self.max_queued_s = max_queued_s
        self._utterances: deque[np.ndarray] = deque()
        self._offset = 0  # samples of the first utterance already taken
        self.utterances_spoken = 0
        self.starts_s: deque[float] = deque(maxlen=16)  # stream times the latest utterances began (newest last)

    @property
    def queued_s(self) -> float:
        return (sum(len(u) for u in self._utterances) - self._offset) / RATE_HZ

    @property
    def speaking(self) -> bool:
        return bool(self._utterances)

    def add(self, pcm: np.ndarray) -> float:
        """Queue after what is queued; returns seconds until it starts. SpeechError if it would not fit."""
        ahead_s = self.queued_s
        if ahead_s + len(pcm) / RATE_HZ > self.max_queued_s:
            raise SpeechError("speech_queue_full", f"{ahead_s:.1f} s of speech is queued and this adds "
                                                   f"{len(pcm) / RATE_HZ:.1f} s; the limit is {self.max_queued_s:g} s "
                                                   "(--server.max_speech_s): interrupt or wait")
        self._utterances.append(pcm.astype(np.int16, copy=False))
        return ahead_s

    def clear(self) -> float:
        """Drop everything queued; returns the seconds dropped."""
        dropped_s = self.queued_s
        self._utterances.clear()
        self._offset = 0
        return dropped_s

    def take(self, count: int, stream_s: float | None = None) -> np.ndarray | None:
        """The next `count` samples of speech (silence-padded at the end), or None when nothing is queued.

        `stream_s` is the stream time of the first sample taken; where an utterance begins is noted in `starts_s`.
        """
        if not self._utterances:
            return None
        out = np.zeros(count, np.int16)
        filled = 0
        while filled < count and self._utterances:
            current = self._utterances[0]
            if self._offset == 0 and stream_s is not None:
                self.starts_s.append(stream_s + filled / RATE_HZ)
            n = min(count - filled, len(current) - self._offset)
            out[filled:filled + n] = current[self._offset:self._offset + n]
            filled += n
            self._offset += n
            if self._offset >= len(current):
                self._utterances.popleft()
                self._offset = 0
                self.utterances_spoken += 1
        return out


def audio_frame(pcm: np.ndarray, pts: int) -> av.AudioFrame:
    """48 kHz mono int16 samples as an av frame on the 48 kHz stream clock (as aiortc's decoder hands them)."""
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = RATE_HZ
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, RATE_HZ)
    return frame


class SpeechInput:
    """A session's speech: the queue, and how it reaches the live path (a feeder, or mixed into a mic)."""

    def __init__(self, max_queued_s: float) -> None:
        self.queue = SpeechQueue(max_queued_s)
        self.fed_until_s = 0.0  # stream time up to which audio has gone into the live path
        self._mic_mono = av.AudioResampler(format="s16", layout="mono", rate=RATE_HZ)

    async def feed(self, push: Callable[[av.AudioFrame], object]) -> None:
        """Run as a session's microphone: one 20 ms frame every 20 ms, speech or silence, until cancelled."""
        started_s = time.monotonic()
        index = 0
        while True:
            due_s = started_s + index * FRAME_S
            now = time.monotonic()
            if now - due_s > MAX_FEED_LAG_S:  # the loop stalled: skip the lost time (a gap, filled with silence)
                index += int((now - due_s) / FRAME_S)
                due_s = started_s + index * FRAME_S
            if due_s > now:
                await asyncio.sleep(due_s - now)
            pcm = self.queue.take(FRAME_SAMPLES, index * FRAME_S)
            push(audio_frame(np.zeros(FRAME_SAMPLES, np.int16) if pcm is None else pcm, index * FRAME_SAMPLES))
            self.fed_until_s = (index + 1) * FRAME_S
            index += 1

    def mix(self, frame: av.AudioFrame) -> av.AudioFrame:
        """A microphone frame with the queued speech added (the frame itself when nothing is queued)."""
        if not self.queue.speaking:
            self._note_fed(frame)
            return frame
        mixed: list[av.AudioFrame] = []
        for out in self._mic_mono.resample(frame):
            mic = out.to_ndarray().reshape(-1).astype(np.int32)
            speech = self.queue.take(len(mic), None if out.pts is None else float(out.pts * out.time_base))
            if speech is not None:
                mic = mic + speech
            mixed.append(audio_frame(np.clip(mic, -32768, 32767).astype(np.int16), out.pts))
        if len(mixed) != 1:  # the resampler holds samples back or splits: hand over one frame per mic frame
            pcm = np.concatenate([m.to_ndarray().reshape(-1) for m in mixed]) if mixed else np.zeros(0, np.int16)
            if not len(pcm):
                return frame
            mixed = [audio_frame(pcm, mixed[0].pts)]
        self._note_fed(mixed[0])
        return mixed[0]

    @property
    def utterance_starts_s(self) -> deque[float]:
        """Stream times at which the latest utterances began to be fed (newest last)."""
        return self.queue.starts_s

    def _note_fed(self, frame: av.AudioFrame) -> None:
        if frame.pts is not None and frame.time_base is not None:
            self.fed_until_s = float(frame.pts * frame.time_base) + frame.samples / frame.sample_rate
