"""Offline long video: a speech file and a reference image in, an MP4 out, written clip by clip.

`python run_server.py offline --audio speech.wav [--image ref.png] --out out.mp4 [--num_clip N]`; without
--image it animates the face the server shows by default (`--server.reference`, else the drawn face).
Each clip is decoded the moment it is denoised and goes straight into the file (H.264 + AAC of the
same speech), so memory stays flat for any length and Ctrl-C leaves a playable file.

Speech features: wav2vec2 runs over the whole file at once, as the reference does offline (bidirectional
context, normalised once; `model.audio_encoder.offline_features window` cuts it like the live path instead).

Length: the video has ceil(audio duration x fps) frames. The last clip is generated whole (its audio
padded with silence) and trimmed to that count, so picture and sound end within one frame of each other.
With --num_clip N both stop at N clips (or the end of the speech, whichever comes first).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from model.config import AppConfig
from model.io_types import AudioWindow
from model.stream.windowing import ClipWindower
from server.reference_image import reference_or_drawn

EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by SIGINT
VIDEO_CRF = "18"  # visually lossless for talking heads; the file is the product here


@dataclass(frozen=True)
class Speech:
    """The speech twice: at the model's rate for the avatar, at its own rate for the file's sound track."""

    model_pcm: np.ndarray  # float32 mono at the model rate
    mux_pcm: np.ndarray  # float32 mono at mux_rate_hz
    mux_rate_hz: int

    @property
    def duration_s(self) -> float:
        return len(self.mux_pcm) / self.mux_rate_hz


def read_speech(path: str | Path, model_rate_hz: int) -> Speech:
    """Decode any audio file av can read, mixed down to mono: at the model rate, and at the file's own rate."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"--audio {path}: the file has no audio stream")
            stream = container.streams.audio[0]
            mux_rate_hz = stream.rate or model_rate_hz
            to_model = av.AudioResampler(format="flt", layout="mono", rate=model_rate_hz)
            to_mux = av.AudioResampler(format="flt", layout="mono", rate=mux_rate_hz)
            model_parts, mux_parts = [], []
            for frame in container.decode(stream):
                frame.pts = None  # resample by sample count; odd input timestamps must not add gaps
                model_parts += [f.to_ndarray()[0] for f in to_model.resample(frame)]
                mux_parts += [f.to_ndarray()[0] for f in to_mux.resample(frame)]
            model_parts += [f.to_ndarray()[0] for f in to_model.resample(None)]
            mux_parts += [f.to_ndarray()[0] for f in to_mux.resample(None)]
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"--audio {path}: cannot read it as audio ({exc})") from None
    model_pcm = np.concatenate(model_parts).astype(np.float32) if model_parts else np.zeros(0, np.float32)
    mux_pcm = np.concatenate(mux_parts).astype(np.float32) if mux_parts else np.zeros(0, np.float32)
    if len(model_pcm) == 0:
        raise ValueError(f"--audio {path}: the audio stream is empty")
    return Speech(model_pcm, mux_pcm, mux_rate_hz)


def read_image(path: str | Path) -> np.ndarray:
    """The reference image as uint8 RGB [H, W, 3]."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as exc:
        raise ValueError(f"--image {path}: cannot read it as an image ({exc})") from None


def clip_windows(pcm: np.ndarray, windower: ClipWindower) -> Iterator[AudioWindow]:
    """Windows of the whole speech, made lazily (a long file never holds all its windows at once)."""
    for start in range(0, len(pcm), windower.clip_samples):
        yield from windower.push(pcm[start:start + windower.clip_samples])
    yield from windower.flush()


class Mp4Writer:
    """H.264 yuv420p video at a fixed fps plus AAC mono sound, written as clips arrive."""

    def __init__(self, path: str | Path, fps: float, frame_size: tuple[int, int], audio_rate_hz: int) -> None:
        self._container = av.open(str(path), mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self._video.height, self._video.width = frame_size
        self._video.pix_fmt = "yuv420p"
        self._video.options = {"crf": VIDEO_CRF, "preset": "veryfast"}
        self._audio = self._container.add_stream("aac", rate=audio_rate_hz, layout="mono")
        self._audio_rate_hz = audio_rate_hz
        self.frames_written = 0
        self.audio_samples_written = 0

    def write(self, frames: np.ndarray, audio: np.ndarray) -> None:
        """Append video frames uint8 [T, H, W, 3] and the sound that plays with them (float32 mono)."""
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self.frames_written
            self._container.mux(self._video.encode(frame))
            self.frames_written += 1
        if len(audio):
            sound = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio, dtype=np.float32)[None], format="fltp",
                                               layout="mono")
            sound.sample_rate = self._audio_rate_hz
            sound.pts = self.audio_samples_written
            self._container.mux(self._audio.encode(sound))
            self.audio_samples_written += len(audio)

    def close(self) -> None:
        """Flush both encoders and write the index: after this the file plays anywhere."""
        try:
            self._container.mux(self._video.encode(None))
            self._container.mux(self._audio.encode(None))
        finally:
            self._container.close()


def run_offline(cfg: AppConfig, args: argparse.Namespace) -> int:
    """Render `args.audio` spoken by `args.image` into `args.out`; 0 when done, 130 when stopped with Ctrl-C."""
    from model.stream.avatar import (  # torch and the models load only for this command
        AvatarModels,
        StreamingAvatar,
    )

    try:
        speech = read_speech(args.audio, cfg.audio_sample_rate_hz)
        image = read_image(args.image) if args.image else reference_or_drawn(cfg.server.reference)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.num_clip is not None and args.num_clip < 1:
        print(f"error: --num_clip must be >= 1, got {args.num_clip}", file=sys.stderr)
        return 2
    models, features = speech_features(cfg, AvatarModels.load(cfg), speech.model_pcm)
    print(f"audio features: {features}", file=sys.stderr)
    avatar = StreamingAvatar(models, cfg)
    avatar.start(image, args.prompt_text or cfg.server.prompt)
    total_frames = math.ceil(len(speech.model_pcm) / cfg.audio_sample_rate_hz * avatar.fps)
    num_clips = math.ceil(total_frames / avatar.frames_per_clip)
    if args.num_clip is not None:
        num_clips = min(num_clips, args.num_clip)
        total_frames = min(total_frames, num_clips * avatar.frames_per_clip)
    windower = ClipWindower(avatar.clip_samples, avatar.context_samples, avatar.sample_rate_hz,
                            lookahead_samples=_window_lookahead_samples(cfg))
    writer = Mp4Writer(args.out, avatar.fps, avatar.frame_size, speech.mux_rate_hz)
    interrupted = False
    try:
        with tqdm(total=num_clips, unit="clip", desc="rendering", file=sys.stderr) as progress:
            for window in clip_windows(speech.model_pcm, windower):
                if window.clip_index >= num_clips:
                    break
                clip = avatar.next_clip(window)
                frames = clip.frames[: total_frames - writer.frames_written]
                with _whole_clip_writes():
                    writer.write(frames, _sound_until(speech, writer, (writer.frames_written + len(frames)) / avatar.fps))
                progress.update(1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        writer.close()
        avatar.close()
    seconds = writer.frames_written / avatar.fps
    if interrupted:
        print(f"stopped: {args.out} holds the first {writer.frames_written} frames ({seconds:.2f} s)", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {args.out}: {writer.frames_written} frames at {avatar.fps:g} fps ({seconds:.2f} s)", file=sys.stderr)
    return 0


def speech_features(cfg: AppConfig, models, pcm: np.ndarray):
    """(models, description): with `model.audio_encoder.offline_features whole_file` the models' speech encoder
    is swapped for wav2vec2 over the whole file (`WholeFileFeatures`: one pass, normalised once, as the
    reference); with `window` the models stay as they are and clips are encoded like the live path's windows."""
    from model.encoders.audio import WholeFileFeatures

    audio = cfg.model.audio_encoder
    if audio.offline_features == "window":
        return models, f"clip windows ({audio.context_s:g} s before each clip, {audio.lookahead_s:g} s after)"
    clip_samples = round(cfg.video.infer_frames / cfg.video.fps * cfg.audio_sample_rate_hz)
    whole = WholeFileFeatures(models.audio_encoder, pcm, clip_samples, audio.whole_file_max_s)
    seconds = len(pcm) / cfg.audio_sample_rate_hz
    how = "one wav2vec2 pass" if whole.pieces == 1 else (
        f"{whole.pieces} pieces of up to {whole.piece_samples / cfg.audio_sample_rate_hz:g} s, each hearing "
        f"{whole.PIECE_CONTEXT_S:g} s more on both sides (--model.audio_encoder.whole_file_max_s)")
    return dataclasses.replace(models, audio_encoder=whole), f"whole file ({seconds:.1f} s, {how}, normalised once)"


def _window_lookahead_samples(cfg: AppConfig) -> int:
    audio = cfg.model.audio_encoder
    return round(audio.lookahead_s * cfg.audio_sample_rate_hz) if audio.offline_features == "window" else 0


@contextmanager
def _whole_clip_writes() -> Iterator[None]:
    """Hold a Ctrl-C that arrives while a clip is being written until the clip is in: the file then ends on a
    whole clip with its sound. Only the main thread can own signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def _sound_until(speech: Speech, writer: Mp4Writer, end_s: float) -> np.ndarray:
    """The speech not yet written, up to stream time `end_s` (the end of the frames written with it)."""
    end = min(len(speech.mux_pcm), round(end_s * speech.mux_rate_hz))
    return speech.mux_pcm[writer.audio_samples_written:end]
