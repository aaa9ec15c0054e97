"""The live microphone path: PortAudio (sounddevice) through ALSA's PulseAudio plugin, reading a null sink's
monitor that pacat plays the speech into, as a person's microphone would be read."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from client_cam.media_in import FRAME_SAMPLES, MicrophoneTrack
from tests.client_cam.conftest import ROOT, PulseDaemon, pulse_daemon  # noqa: F401 (fixture)
from tests.client_cam.test_client_cam import voice_found

pytestmark = pytest.mark.timeout(120)


def test_list_devices_shows_the_microphones(pulse_daemon: PulseDaemon, monkeypatch):  # noqa: F811
    for name, value in pulse_daemon.env.items():
        monkeypatch.setenv(name, value)
    listed = subprocess.run([sys.executable, "-m", "client_cam", "--list-devices"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True).stdout
    assert any(line.split()[1:3] == ["in/out", "pulse"] for line in listed.splitlines()), listed


async def test_microphone_track_sends_what_the_microphone_hears(pulse_daemon: PulseDaemon,  # noqa: F811
                                                                speech_wav, speech_pcm, monkeypatch):
    pulse_daemon.pactl("load-module", "module-null-sink", "sink_name=MicFeed")
    for name, value in {**pulse_daemon.env, "PULSE_SOURCE": "MicFeed.monitor"}.items():
        monkeypatch.setenv(name, value)

    track = MicrophoneTrack("pulse")
    player = await asyncio.create_subprocess_exec("pacat", "--playback", "--device=MicFeed", "--file-format=wav",
                                                  str(speech_wav))
    try:
        frames = [await asyncio.wait_for(track.recv(), 5.0)
                  for _ in range(round((len(speech_pcm) / 48000 + 1.0) / 0.02))]
    finally:
        track.stop()
        await player.wait()
    assert all(f.samples == FRAME_SAMPLES and f.sample_rate == 48000 for f in frames)
    assert [f.pts for f in frames] == [i * FRAME_SAMPLES for i in range(len(frames))]
    heard = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float64)
    voiced_s, found_s, summary = voice_found(speech_pcm, heard)
    assert found_s >= 0.9 * voiced_s, f"only {found_s:.2f} of {voiced_s:.2f} s of the speech was heard: {summary}"
