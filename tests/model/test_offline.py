"""Offline CLI: an MP4 whose frame count and duration match the speech, playable even after Ctrl-C."""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from run_server import main

ROOT = Path(__file__).resolve().parents[2]
# Small and fast, same code path: random weights (a narrower VAE than any trained one), 64x64, one step.
FAST = ["--model.checkpoint", "null", "--video.size", "64*64", "--sample_steps", "1", "--model.vae.base_dim", "8"]
FPS = 16


def write_wav(path: Path, pcm: np.ndarray, rate_hz: int) -> Path:
    """int16 WAV; pcm float [N] or [N, channels]."""
    pcm = pcm if pcm.ndim == 2 else pcm[:, None]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(pcm.shape[1])
        out.setsampwidth(2)
        out.setframerate(rate_hz)
        out.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def voiced_tone(duration_s: float, rate_hz: int, channels: int = 1) -> np.ndarray:
    t = np.arange(round(duration_s * rate_hz)) / rate_hz
    mono = 0.3 * np.sin(2 * np.pi * 140 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return np.repeat(mono[:, None], channels, axis=1) if channels > 1 else mono


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "ref.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(path)
    return path


def probe(path: Path) -> dict:
    """Frame count (decoded), and each stream's duration in seconds."""
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        info = {"video_codec": video.codec_context.name, "audio_codec": audio.codec_context.name,
                "size": (video.height, video.width),
                "video_s": float(video.duration * video.time_base), "audio_s": float(audio.duration * audio.time_base)}
        info["frames"] = sum(1 for _ in container.decode(video=0))
    return info


def test_mp4_has_one_frame_per_16th_of_a_second_of_speech_and_the_speech_itself(tmp_path, image):
    speech = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), "Hello, I am the avatar of this test."], check=True)
    with wave.open(str(speech)) as w:
        duration_s = w.getnframes() / w.getframerate()
    out = tmp_path / "out.mp4"
    assert main(["offline", "--audio", str(speech), "--image", str(image), "--out", str(out), *FAST]) == 0
    info = probe(out)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["size"] == (64, 64)
    assert info["frames"] == math.ceil(duration_s * FPS)
    assert info["video_s"] == pytest.approx(duration_s, abs=1 / FPS)
    assert info["audio_s"] == pytest.approx(duration_s, abs=0.05)  # AAC rounds to its 1024-sample frames


def test_num_clip_stops_video_and_sound_after_n_clips(tmp_path, image):
    speech = write_wav(tmp_path / "stereo44k.wav", voiced_tone(3.0, 44100, channels=2), 44100)
    out = tmp_path / "two_clips.mp4"
    args = ["offline", "--audio", str(speech), "--image", str(image), "--out", str(out), "--num_clip", "2", *FAST]
    assert main(args) == 0
    info = probe(out)
    assert info["frames"] == 2 * 12
    assert info["video_s"] == pytest.approx(1.5)
    assert info["audio_s"] == pytest.approx(1.5, abs=0.05)


def test_without_image_it_animates_the_servers_default_face(tmp_path):
    """No --image: the drawn face the server shows by default (trained bundle, one clip), not some other image."""
    from server.reference_image import drawn_reference, resize_rgb

    speech = write_wav(tmp_path / "tone.wav", voiced_tone(1.0, 16000), 16000)
    out = tmp_path / "default_face.mp4"
    assert main(["offline", "--audio", str(speech), "--out", str(out), "--num_clip", "1"]) == 0
    with av.open(str(out)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float64)
    drawn = resize_rgb(drawn_reference(), *frames.shape[1:3]).astype(np.float64)
    r = np.corrcoef(frames.mean(axis=0).ravel(), drawn.ravel())[0, 1]
    assert r > 0.8, f"the video does not show the drawn default face (r {r:.2f})"


def test_unreadable_audio_is_reported_with_its_path(tmp_path, image, capsys):
    bad = tmp_path / "not_audio.wav"
    bad.write_bytes(b"this is not audio")
    assert main(["offline", "--audio", str(bad), "--image", str(image), "--out", str(tmp_path / "x.mp4")]) == 2
    assert str(bad) in capsys.readouterr().err


def clips_rendered(stderr: bytes) -> int:
    """The highest clip count the offline progress bar has printed so far."""
    return max((int(n) for n in re.findall(rb"\| *(\d+)/\d+ \[", bytes(stderr))), default=0)


def test_ctrl_c_leaves_a_playable_file_with_the_clips_made_so_far(tmp_path, image):
    speech = write_wav(tmp_path / "long.wav", voiced_tone(30.0, 16000), 16000)
    out = tmp_path / "interrupted.mp4"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "run_server.py", "offline", "--audio", str(speech), "--image", str(image), "--out", str(out),
         *FAST], cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    stderr = bytearray()
    reader = threading.Thread(target=lambda: [stderr.extend(chunk) for chunk in iter(lambda: proc.stderr.read1(256), b"")])
    reader.start()
    deadline = time.monotonic() + 240
    # the progress bar prints at most every 0.1 s, so on a fast run it can skip a count: wait for any >= 2
    while clips_rendered(stderr) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, stderr.decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, stderr.decode(errors="replace")
    reader.join()
    info = probe(out)
    assert 2 * 12 <= info["frames"] < 40 * 12 and info["frames"] % 12 == 0
    assert info["video_s"] == pytest.approx(info["frames"] / FPS)
    assert info["audio_s"] == pytest.approx(info["video_s"], abs=0.05)


def test_speech_features_come_from_one_pass_over_the_whole_file_unless_windows_are_asked_for(tmp_path, image, capsys):
    speech = write_wav(tmp_path / "tone.wav", voiced_tone(2.0, 16000), 16000)
    videos = {}
    for features in ("whole_file", "window"):
        out = tmp_path / f"{features}.mp4"
        args = ["offline", "--audio", str(speech), "--image", str(image), "--out", str(out), *FAST,
                "--model.audio_encoder.offline_features", features]
        assert main(args) == 0
        err = capsys.readouterr().err
        with av.open(str(out)) as container:
            videos[features] = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        if features == "whole_file":
            assert "audio features: whole file (2.0 s, one wav2vec2 pass, normalised once)" in err
        else:
            assert "audio features: clip windows (1 s before each clip, 0 s after)" in err
    assert videos["whole_file"].shape == videos["window"].shape == (32, 64, 64, 3)
    assert not np.array_equal(videos["whole_file"], videos["window"])  # other features, other frames
