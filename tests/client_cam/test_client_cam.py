"""client_cam against a real server on loopback (the tiny model, real WebRTC), run as a person runs it.

The avatar's video and returned voice land in the MP4 in step; the voice plays into a real PulseAudio
null sink (the Linux virtual microphone) that the client makes and removes; a missing camera, an
unreachable server, a refused token and a full server each end in one line that says what to do.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from client_cam.camera_sink import MODPROBE
from server.reference_image import drawn_reference, resize_rgb
from tests.client_cam.conftest import ROOT, PulseDaemon, run_client_cam
from tests.server.av_analysis import align_chunks, align_pieces, first_clip_frame
from tests.server.conftest import start_server
from tests.server.reliability_support import JsonSocket, offer_sdp, running_server, server_state, small_cfg
from tests.server.test_live_loopback import queued_parts  # noqa: F401 (fixture: the frames the model made)
from tests.server.webrtc_client import ReceivedVideo

pytestmark = pytest.mark.timeout(240)

RATE_HZ = 48000
SINK = "LiveAvatarTest"


@dataclass
class Recording:
    fps: float
    video: list[ReceivedVideo]  # arrival_s holds the frame's time in the file
    audio: np.ndarray  # the voice, float, 48 kHz mono, sample i at i / 48000 s in the file


def read_mp4(path: Path) -> Recording:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.base_rate)
        video = [ReceivedVideo(f.pts, f.time_base, f.to_ndarray(format="rgb24"), float(f.time))
                 for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        assert container.streams.audio[0].sample_rate == RATE_HZ
        pieces = [(max(0, round(f.time * RATE_HZ)), f.to_ndarray()[0]) for f in container.decode(audio=0)]
    audio = np.zeros(max(start + len(pcm) for start, pcm in pieces))
    for start, pcm in pieces:
        audio[start:start + len(pcm)] = pcm * 32768
    return Recording(fps, video, audio)


def speech_came_back(server, speech_s: float):
    """True once the server's session has played the whole speech: clips played (or dropped) two clips past its end, and
    its latency plus a margin gone by (a loaded machine's latency grows during the speech, so time alone is not
    enough)."""
    state = server_state(server)

    def done() -> bool:
        sessions = list(state.sessions)
        if not sessions:
            return False
        stats = sessions[0].stats()
        latency_ms, clip_s = stats["latency_ms"], stats["clip_ms"] / 1000
        covered_s = (stats["clips_played"] + stats["clips_dropped"]) * clip_s
        return (latency_ms is not None and covered_s >= speech_s + 2 * clip_s
                and time.monotonic() - sessions[0].started_s > speech_s + latency_ms / 1000 + 1.5)

    return done


def voice_found(speech_pcm: np.ndarray, received: np.ndarray) -> tuple[float, float, list]:
    """(seconds of voiced speech, seconds of it found unchanged in `received`, where each piece was)."""
    pieces = align_pieces(speech_pcm, received)
    found = [p for p in pieces if p.peak > 0.8]
    return (sum(p.samples for p in pieces) / RATE_HZ, sum(p.samples for p in found) / RATE_HZ,
            [(p.start_samples / RATE_HZ, round(p.peak, 2)) for p in pieces])


async def test_call_recording_and_virtual_microphone_carry_the_avatar_and_the_voice_in_sync(
        tiny_engine, tiny_cfg, speech_wav, speech_pcm, queued_parts, pulse_daemon: PulseDaemon, tmp_path):  # noqa: F811
    server, runner = await start_server(tiny_cfg, tiny_engine)
    out = tmp_path / "call.mp4"
    monitor_raw = tmp_path / "monitor.raw"
    recorder: list[subprocess.Popen] = []
    played = speech_came_back(server, len(speech_pcm) / RATE_HZ)

    def record_monitor_then_wait_for_the_speech() -> bool:
        if not recorder and SINK in pulse_daemon.pactl("list", "short", "sinks"):
            recorder.append(pulse_daemon.record(f"{SINK}.monitor", monitor_raw))
        return played()

    try:
        run = await run_client_cam("--server", server.url, "--audio", str(speech_wav), "--out", str(out),
                                   "--virtual-mic", SINK, "--seconds", "120", env=pulse_daemon.env,
                                   stop_when=record_monitor_then_wait_for_the_speech)
    finally:
        await runner.cleanup()
        for proc in recorder:
            proc.terminate()
            proc.wait(10)
    assert run.returncode == 0, run.stderr
    assert not run.error_lines, run.stderr
    assert recorder, "the client never made the null sink"
    # Ctrl-C left the sound server as it was: the sink and its microphone source are gone
    assert SINK not in pulse_daemon.pactl("list", "short", "sinks")
    assert SINK not in pulse_daemon.pactl("list", "short", "sources")

    fmt = tiny_engine.stream_format
    recording = read_mp4(out)
    video = recording.video
    assert recording.fps == pytest.approx(fmt.fps)
    assert {v.rgb.shape for v in video} == {(*fmt.frame_size, 3)}
    # a frame in every slot (a constant frame rate, as a camera gives), over longer than the speech
    assert np.allclose(np.diff([v.arrival_s for v in video]), 1 / fmt.fps)
    assert len(video) >= fmt.fps * len(speech_pcm) / RATE_HZ

    # the returned voice, in the file and in the virtual microphone
    voiced_s, in_file_s, file_pieces = voice_found(speech_pcm, recording.audio)
    monitor = np.frombuffer(monitor_raw.read_bytes(), dtype="<i2").astype(np.float64)
    _, in_sink_s, sink_pieces = voice_found(speech_pcm, monitor)
    assert voiced_s >= 2.0
    assert in_file_s >= 0.9 * voiced_s, f"MP4: {in_file_s:.2f} of {voiced_s:.2f} s came back: {file_pieces}; " \
                                        f"null sink: {in_sink_s:.2f} s: {sink_pieces}"
    # the sink plays in real time: where the client is starved of CPU for longer than the sound server's buffer
    # (a loaded 2-core machine) the voice pauses there and goes on a little later, which costs short pieces
    assert in_sink_s >= 0.75 * voiced_s, f"null sink: {in_sink_s:.2f} of {voiced_s:.2f} s came back: {sink_pieces}"

    # A/V: clip 0's first frame is where the speech's first sample is heard, within one frame
    reference = resize_rgb(drawn_reference(), *fmt.frame_size)
    clip0 = np.concatenate([p.frames for p in queued_parts if p.clip_index == 0])
    first = first_clip_frame(video, reference, clip0)
    assert first is not None, "no frame of clip 0 in the recording"
    opening = next((c for c in align_chunks(speech_pcm[:round(fmt.frames_per_clip / fmt.fps * RATE_HZ)],
                                            recording.audio, 0.125) if c.peak > 0.8), None)
    assert opening is not None, "the speech's opening is not in the recording"
    sample0_s = (opening.lag_samples - opening.start_samples) / RATE_HZ
    offset_s = first.arrival_s - sample0_s
    print(f"A/V offset in the recording: {offset_s * 1000:+.1f} ms (video after voice > 0)")
    assert abs(offset_s) <= 1 / fmt.fps, f"A/V offset {offset_s * 1000:.0f} ms is more than one frame"


def test_missing_camera_says_exactly_what_to_run(tmp_path):
    """v4l2loopback is a kernel module and CI machines (containers) cannot load one, so the camera path is
    tested up to the device: pyvirtualcam's v4l2loopback backend is asked for a device that is not there."""
    run = subprocess.run([sys.executable, "-m", "client_cam", "--server", "http://127.0.0.1:9", "--camera",
                          str(tmp_path / "video-missing"), "--virtual-mic", "off"],
                         check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no virtual camera device at"), run.stderr
    assert MODPROBE in lines[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_unreachable_server_is_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    run = await run_client_cam("--server", url, "--audio", str(tmp_path / "none.wav"), "--out", "x.mp4")
    assert run.returncode == 2 and run.error_lines == [f"error: --audio {tmp_path / 'none.wav'}: no such file"]
    speech = tmp_path / "tone.wav"
    write_tone(speech)
    run = await run_client_cam("--server", url, "--audio", str(speech), "--out", str(tmp_path / "x.mp4"))
    assert run.returncode == 1, run.stderr
    assert len(run.error_lines) == 1 and run.error_lines[0].startswith(f"error: cannot reach the server at {url}")


def write_tone(path: Path, seconds: float = 1.0) -> None:
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=RATE_HZ, layout="mono")
        t = np.arange(int(seconds * RATE_HZ)) / RATE_HZ
        frame = av.AudioFrame.from_ndarray((3000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)[None],
                                           format="s16", layout="mono")
        frame.sample_rate = RATE_HZ
        frame.time_base = Fraction(1, RATE_HZ)
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


async def test_refused_token_and_full_server_are_one_line_each(tmp_path, monkeypatch):
    monkeypatch.delenv("LIVEAVATAR_TOKEN", raising=False)
    speech = tmp_path / "tone.wav"
    write_tone(speech)
    common = ("--audio", str(speech), "--out", str(tmp_path / "x.mp4"))
    cfg = small_cfg(**{"server.token": "right-token", "server.max_sessions": 1})
    async with running_server(cfg) as (server, _):
        run = await run_client_cam("--server", server.url, "--token", "wrong", *common)
        assert run.returncode == 1 and len(run.error_lines) == 1, run.stderr
        assert "refused the token" in run.error_lines[0] and "does not match" in run.error_lines[0]
        run = await run_client_cam("--server", server.url, *common)
        assert run.returncode == 1 and len(run.error_lines) == 1, run.stderr
        assert "needs a token" in run.error_lines[0] and "pass --token" in run.error_lines[0]

        pc, sdp = await offer_sdp()  # someone else takes the only slot
        holder = await JsonSocket.connect(server.ws_url, additional_headers={"Authorization": "Bearer right-token"})
        try:
            assert (await holder.request({"type": "offer", "sdp": sdp}))["type"] == "answer"
            run = await run_client_cam("--server", server.url, "--token", "right-token", *common)
        finally:
            await holder.close()
            await pc.close()
        assert run.returncode == 1 and len(run.error_lines) == 1, run.stderr
        assert "busy" in run.error_lines[0] and "all 1 session slots are in use" in run.error_lines[0]


async def test_dropped_session_reconnects_with_its_settings_and_the_camera_is_fed_meanwhile(tmp_path):
    """The server ends the session under the client (as when its worker dies): the client says so, keeps
    writing frames while it waits out the back-off, and comes back with a new session with the same
    reference picture and sample_steps."""
    speech = tmp_path / "tone.wav"
    write_tone(speech)
    out = tmp_path / "reconnect.mp4"
    face = np.zeros((96, 80, 3), dtype=np.uint8)
    face[..., 0] = np.linspace(0, 255, 80, dtype=np.uint8)[None, :]  # a red ramp left to right
    face[..., 2] = np.linspace(255, 0, 96, dtype=np.uint8)[:, None]  # a blue ramp top to bottom
    Image.fromarray(face).save(tmp_path / "face.png")
    async with running_server(small_cfg()) as (server, _):
        state = server_state(server)
        seen: list = []  # sessions once connected, in order
        steps: list[int] = []  # the reconnected session's sample_steps
        connected_at_s: list[float] = []

        def drop_once_then_wait_for_the_next() -> bool:
            for session in state.sessions:
                if session not in seen and session.connection_state == "connected":
                    seen.append(session)
                    connected_at_s.append(time.monotonic())
            up_s = [time.monotonic() - t for t in connected_at_s]
            if len(seen) == 1 and up_s[0] > 2.0 and not seen[0].closed.is_set():
                seen[0].fail("worker_failed", "the model worker restarted")
            if len(seen) == 2 and up_s[1] > 2.0:
                steps.append(seen[1].stats()["sample_steps"])
                return True
            return False

        run = await run_client_cam("--server", server.url, "--audio", str(speech), "--out", str(out),
                                   "--reference", str(tmp_path / "face.png"), "--sample_steps", "2",
                                   "--prompt", "a test face", stop_when=drop_once_then_wait_for_the_next)
    assert run.returncode == 0, run.stderr
    assert len(seen) == 2, run.stderr
    for session in seen:  # the picture the client sent, as the server sized it, and its sample_steps
        expected = resize_rgb(face, *session.reference_rgb.shape[:2]).astype(float)
        assert np.abs(session.reference_rgb.astype(float) - expected).mean() < 6, "not the --reference picture"
    assert steps == [2]
    assert "connection lost (the model worker restarted); reconnecting in 1 s" in run.stderr
    # through the outage (1 s of back-off plus the new offer) the camera kept getting frames, breathing ones
    # in the recording too, and the file has a frame in every slot
    filled = re.search(r"stopped: \d+ frames out, (\d+) of them while no frame came", run.stderr)
    assert filled and int(filled.group(1)) >= 8, run.stderr
    video = read_mp4(out).video
    assert np.allclose(np.diff([v.arrival_s for v in video]), 1 / 16)
