"""client_cam test fixtures: the server tests' speech, tiny model and server (imported, not copied), the
client run as its own process the way a person starts it, and a private PulseAudio daemon."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.server.conftest import speech_pcm, speech_wav, tiny_cfg, tiny_engine  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ClientRun:
    returncode: int
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


async def run_client_cam(*args: str, env: dict[str, str] | None = None, stop_when: Callable[[], bool] | None = None,
                         timeout_s: float = 150.0) -> ClientRun:
    """`python -m client_cam ARGS` as a separate process; SIGINT (Ctrl-C) once `stop_when()` holds."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client_cam", *args, cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    communicate = asyncio.ensure_future(proc.communicate())
    deadline = time.monotonic() + timeout_s
    interrupted = False
    while not communicate.done():
        if time.monotonic() > deadline:
            proc.kill()
            break
        if stop_when is not None and not interrupted and stop_when():
            proc.send_signal(signal.SIGINT)
            interrupted = True
        await asyncio.wait([communicate], timeout=0.25)
    _, err = await communicate
    return ClientRun(proc.returncode, err.decode())


@dataclass
class PulseDaemon:
    env: dict[str, str]  # what a client needs to reach it (PULSE_SERVER)

    @property
    def full_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def record(self, source: str, path: Path) -> subprocess.Popen:
        """parec of `source` as raw s16le mono 48 kHz into `path` until terminated."""
        with path.open("wb") as out:
            return subprocess.Popen(["parec", f"--device={source}", "--rate=48000", "--channels=1", "--format=s16le"],
                                    stdout=out, stderr=subprocess.DEVNULL, env=self.full_env)

    def pactl(self, *args: str) -> str:
        return subprocess.run(["pactl", *args], env=self.full_env, check=True, capture_output=True, text=True,
                              timeout=10).stdout


@pytest.fixture
def pulse_daemon(tmp_path: Path) -> Iterator[PulseDaemon]:
    """A PulseAudio user daemon of our own (temp runtime dir, no idle exit), stopped afterwards."""
    binary = shutil.which("pulseaudio")
    assert binary and shutil.which("pactl") and shutil.which("parec"), \
        "PulseAudio is required (make setup installs the Debian package pulseaudio)"
    runtime = tmp_path / "pulse-runtime"
    runtime.mkdir(mode=0o700)
    socket_path = runtime / "native"
    env = {"XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path), "PULSE_RUNTIME_PATH": str(runtime)}
    log_path = tmp_path / "pulseaudio.log"
    daemon = subprocess.Popen(
        [binary, "--daemonize=no", "--exit-idle-time=-1", "-n", "--disallow-exit",
         f"--load=module-native-protocol-unix socket={socket_path} auth-anonymous=1", "--log-target=stderr"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log_path.open("wb"))
    client_env = {"PULSE_SERVER": f"unix:{socket_path}", "HOME": str(tmp_path)}
    pulse = PulseDaemon(client_env)
    try:
        for _ in range(100):
            if daemon.poll() is not None:
                raise AssertionError(f"pulseaudio exited: {log_path.read_text()[-2000:]}")
            try:
                pulse.pactl("info")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.1)
        else:
            raise AssertionError("pulseaudio did not come up in 10 s")
        yield pulse
    finally:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
