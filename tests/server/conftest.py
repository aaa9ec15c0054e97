"""Server test fixtures: espeak-ng speech, a running server on a free loopback port, the generator behind it."""
from __future__ import annotations

import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from aiohttp import web

from model.config import AppConfig, load_config
from server.app import build_app
from server.reference_image import drawn_reference

SPEECH_TEXT = ("Hello there. This is a test of the live avatar server. "
               "The avatar should move its lips in time with these words, one clip at a time.")


def read_wav_48k_mono(path: Path) -> np.ndarray:
    """Any wav -> int16 mono at 48 kHz (what a browser mic would give after Opus)."""
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        chunks = [out.to_ndarray().reshape(-1) for frame in container.decode(audio=0)
                  for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.int16)


def write_wav(path: Path, pcm: np.ndarray, rate_hz: int) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate_hz)
        out.writeframes(pcm.astype(np.int16).tobytes())


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 5 s of espeak-ng speech at 48 kHz mono."""
    espeak = shutil.which("espeak-ng")
    assert espeak, "espeak-ng is required (make setup installs it)"
    folder = tmp_path_factory.mktemp("speech")
    raw = folder / "espeak.wav"
    subprocess.run([espeak, "-s", "170", "-w", str(raw), SPEECH_TEXT], check=True)
    pcm = read_wav_48k_mono(raw)[: 5 * 48000]
    path = folder / "speech_48k.wav"
    write_wav(path, pcm, 48000)
    return path


@pytest.fixture(scope="session")
def speech_pcm(speech_wav: Path) -> np.ndarray:
    return read_wav_48k_mono(speech_wav)


# Frames the model made are told apart from idle frames (the reference) by how they differ from the reference;
# video.detail_restore shows the reference itself wherever the model holds still, so transport tests run the
# bare decode (tests/server/test_live_lip_sync.py and tests/model/test_detail_restore.py run it on).
BARE_DECODE = {"video.detail_restore": False}


@pytest.fixture(scope="session")
def tiny_cfg() -> AppConfig:
    return load_config(None, {"server.max_sessions": 2, "server.stats_interval_s": 0.5, **BARE_DECODE})


@pytest.fixture
async def tiny_engine(tiny_cfg: AppConfig):
    """The real tiny model behind the engine (random weights unless configs/tiny.yaml names a checkpoint)."""
    from server.engine import ModelEngine

    engine = ModelEngine(tiny_cfg)
    await engine.load()
    yield engine
    await engine.close()


@dataclass
class RunningServer:
    url: str
    ws_url: str
    app: web.Application


async def start_server(cfg: AppConfig, engine) -> tuple[RunningServer, web.AppRunner]:
    app = build_app(cfg, engine, drawn_reference())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return RunningServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws", app), runner
