"""The Linux virtual microphone on a real PulseAudio daemon: a sink the client made goes away with it, a
sink that was there stays, and no sound server is one clear line."""
from __future__ import annotations

import numpy as np
import pytest

from client_cam.errors import ClientError
from client_cam.mic_sink import PulseNullSinkMic
from tests.client_cam.conftest import PulseDaemon, pulse_daemon  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(60)


def modules(pulse: PulseDaemon) -> list[str]:
    return sorted(line.split("\t")[1] for line in pulse.pactl("list", "short", "modules").splitlines())


async def test_made_sink_and_source_are_removed_and_an_existing_sink_is_kept(pulse_daemon: PulseDaemon,  # noqa: F811
                                                                            monkeypatch):
    for name, value in pulse_daemon.env.items():
        monkeypatch.setenv(name, value)
    before = modules(pulse_daemon)
    mic = PulseNullSinkMic("CallMic")
    await mic.start()
    sinks, sources = pulse_daemon.pactl("list", "short", "sinks"), pulse_daemon.pactl("list", "short", "sources")
    assert "CallMic" in sinks and "CallMic_mic" in sources, (sinks, sources)
    mic.write(np.zeros(960, dtype=np.int16))
    await mic.close()
    assert modules(pulse_daemon) == before, "the client left modules behind"

    pulse_daemon.pactl("load-module", "module-null-sink", "sink_name=Shared")
    before = modules(pulse_daemon)
    mic = PulseNullSinkMic("Shared")
    await mic.start()
    await mic.close()
    after = modules(pulse_daemon)
    assert after == before, f"a sink someone else made must outlive the client: {before} -> {after}"


async def test_no_sound_server_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PULSE_SERVER", f"unix:{tmp_path / 'no-such-socket'}")
    with pytest.raises(ClientError, match="is PulseAudio or PipeWire's pulse server running") as refused:
        await PulseNullSinkMic("CallMic").start()
    assert "\n" not in str(refused.value)
