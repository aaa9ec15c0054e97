"""`run_server.py --virtualcam`: the first session's voice plays into a real PulseAudio null sink (the same sink
code as client_cam), the flag is a bare boolean, and a missing camera stops the start with what to run.

v4l2loopback is a kernel module that CI machines (containers) cannot load, so the camera is tested up to
the device: the start-up check is pointed at a device that does not exist.
"""
from __future__ import annotations

import numpy as np
import pytest

import run_server
from client_cam.camera_sink import MODPROBE
from model.config import ConfigError
from server.virtualcam import PUBLISHER_KEY
from tests.client_cam.conftest import PulseDaemon, pulse_daemon  # noqa: F401 (fixture)
from tests.client_cam.test_client_cam import voice_found
from tests.server.reliability_support import running_server, small_cfg
from tests.server.webrtc_client import run_client

pytestmark = pytest.mark.timeout(240)

SINK = "LiveAvatarServerTest"


def test_virtualcam_is_a_bare_flag_and_bad_values_name_it():
    _, _, cfg = run_server.parse_args(["--virtualcam", "--port", "9000"])
    assert cfg.server.virtualcam and cfg.server.port == 9000
    _, _, cfg = run_server.parse_args(["--virtualcam", "false"])
    assert not cfg.server.virtualcam
    with pytest.raises(ConfigError, match="--server.virtualcam: expected true or false"):
        run_server.parse_args(["--virtualcam", "maybe"])
    with pytest.raises(ConfigError, match="--server.virtualcam: .*nothing to publish"):
        run_server.parse_args(["--virtualcam", "--virtualcam_device", "off", "--virtualcam_mic", "off"])
    with pytest.raises(ConfigError, match="--port: needs a value"):
        run_server.parse_args(["--port"])


def test_missing_camera_stops_the_start_with_what_to_run(tmp_path, capsys):
    code = run_server.main(["--virtualcam", "--virtualcam_device", str(tmp_path / "video-missing")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and MODPROBE in err[0] and "--virtualcam_device off" in err[0], err


async def test_first_session_plays_into_the_virtual_microphone(pulse_daemon: PulseDaemon, speech_pcm,  # noqa: F811
                                                               monkeypatch, tmp_path):
    for name, value in pulse_daemon.env.items():
        monkeypatch.setenv(name, value)
    cfg = small_cfg(**{"server.virtualcam": True, "server.virtualcam_device": "off",
                       "server.virtualcam_mic": SINK})
    monitor_raw = tmp_path / "monitor.raw"
    async with running_server(cfg) as (server, _):
        assert SINK in pulse_daemon.pactl("list", "short", "sinks"), "the server did not make its null sink"
        parec = pulse_daemon.record(f"{SINK}.monitor", monitor_raw)
        try:
            client = await run_client(server, speech_pcm, until_s=90)
        finally:
            parec.terminate()
            parec.wait(10)
        publisher = server.app[PUBLISHER_KEY]
        assert publisher.sessions_shown == 1
        assert publisher.output.counters.frames_in > 0, "no video reached the publisher"
    assert not client.errors(), client.errors()
    assert SINK not in pulse_daemon.pactl("list", "short", "sinks"), "the null sink outlived the server"
    voiced_s, found_s, summary = voice_found(speech_pcm, np.frombuffer(monitor_raw.read_bytes(), "<i2").astype(float))
    # the sink plays in real time; a loaded machine that starves the server's loop longer than the sound server's
    # buffer pauses the voice there, which costs short pieces (tests/client_cam/test_client_cam.py says the same)
    assert found_s >= 0.75 * voiced_s, f"only {found_s:.2f} of {voiced_s:.2f} s reached the null sink: {summary}"
