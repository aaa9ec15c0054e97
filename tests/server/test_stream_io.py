"""Streams in and out of a session: WHIP ingest from an aiortc client, RTMP push to a local `ffmpeg -listen`
(and its reconnect), the fragmented-MP4 recording; each read back with av."""
from __future__ import annotations

import asyncio
import io
import shutil
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import VideoStreamTrack

from tests.server.av_analysis import align_pieces, audio_timeline
from tests.server.conftest import write_wav
from tests.server.reliability_support import running_server, server_state, small_cfg
from tests.server.test_sessions_api import FAST, post, speech_played, wait_until
from tests.server.webrtc_client import SpeechTrack, WhepClient

pytestmark = pytest.mark.timeout(240)

RATE_HZ = 48000
SPEECH_S = 3.0


def voice_found(sent: np.ndarray, received: np.ndarray) -> float:
    """Share of the sent speech's voiced pieces found whole (normalised correlation > 0.8) in `received`."""
    pieces = align_pieces(sent, received.astype(np.float64))
    voiced = sum(p.samples for p in pieces)
    return sum(p.samples for p in pieces if p.peak > 0.8) / max(voiced, 1)


def read_back(data: bytes | str) -> dict:
    """Streams, duration and decoded audio (48 kHz mono) of a recorded file, through av."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with av.open(source) as container:
        codecs = sorted(s.codec_context.name for s in container.streams)
        video_frames, audio, last_s = 0, [], 0.0
        mono = av.AudioResampler(format="s16", layout="mono", rate=RATE_HZ)
        for frame in container.decode(*container.streams):
            if frame.pts is not None:
                last_s = max(last_s, float(frame.pts * frame.time_base))
            if isinstance(frame, av.VideoFrame):
                video_frames += 1
            else:
                audio += [out.to_ndarray().reshape(-1) for out in mono.resample(frame)]
    return {"codecs": codecs, "video_frames": video_frames, "duration_s": last_s,
            "audio": np.concatenate(audio) if audio else np.zeros(0, np.int16)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rtmp_listener(url: str, out: Path, seconds: float | None = None) -> subprocess.Popen:
    """`ffmpeg -listen 1`: an RTMP ingest that writes what it gets to an FLV (stops after `seconds` if given)."""
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg is required (make setup installs it)"
    limit = ["-t", str(seconds)] if seconds else []
    return subprocess.Popen([ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-listen", "1", "-i", url, *limit,
                             "-c", "copy", "-f", "flv", str(out)], stdin=subprocess.DEVNULL)


async def wait_exit(process: subprocess.Popen, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{process.args[0]} did not exit within {timeout_s} s")
        await asyncio.sleep(0.2)
    return process.returncode


async def speak_wav(http: aiohttp.ClientSession, server, session_id: str, pcm: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "speech.wav"
    write_wav(path, pcm, RATE_HZ)
    status, reply = await post(http, server.url + f"/sessions/{session_id}/speak", data=path.read_bytes(),
                               headers={"Content-Type": "audio/wav"})
    assert status == 202, reply


async def test_whip_ingest_drives_a_session_watched_over_whep(speech_pcm):
    cfg = small_cfg(**FAST)
    speech = speech_pcm[: int(SPEECH_S * RATE_HZ)]
    client = RTCPeerConnection()
    client.addTrack(SpeechTrack(speech))
    client.addTrack(VideoStreamTrack())  # an encoder's camera: declined by the server
    await client.setLocalDescription(await client.createOffer())
    async with running_server(cfg) as (server, engine), aiohttp.ClientSession() as http:
        try:
            async with http.post(server.url + "/whip", data=client.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as response:
                answer = await response.text()
                assert response.status == 201, answer
                location, session_id = response.headers["Location"], response.headers["X-Session-Id"]
                assert location == f"/whip/{session_id}" and "rel=\"whep\"" in response.headers["Link"]
            assert "m=video" in answer and "a=inactive" in answer.split("m=video", 1)[1], "video must be declined"
            await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            session = next(s for s in server_state(server).sessions if s.session_id == session_id)
            assert session.kind == "whip"
            viewer = WhepClient(server.url + f"/sessions/{session_id}/whep")
            await viewer.connect()
            try:
                await wait_until(lambda: session.has_mic and (session.clock.stream_time_at(time.monotonic()) or 0)
                                 > SPEECH_S + 0.5, 120, "the WHIP speech to play")
            finally:
                await viewer.close()
            async with http.delete(server.url + location) as response:
                assert response.status == 200
            await wait_until(lambda: not server_state(server).sessions, 20, "the WHIP session to end")
            assert engine.active_sessions == 0
        finally:
            await client.close()
    assert session.clips_played >= 2
    pcm, _ = audio_timeline(viewer.audio)
    assert voice_found(speech, pcm) >= 0.75, "the WHIP client's voice did not come back over WHEP"


async def test_rtmp_push_reaches_a_listener_and_reconnects_after_it_drops(speech_pcm, tmp_path):
    cfg = small_cfg(**FAST)
    speech = speech_pcm[: int(SPEECH_S * RATE_HZ)]
    url = f"rtmp://127.0.0.1:{free_port()}/live/test"
    first_listener = rtmp_listener(url, tmp_path / "first.flv", seconds=1.0)  # takes a second, then drops it
    second_listener = None
    try:
        async with running_server(cfg) as (server, engine), aiohttp.ClientSession() as http:
            await asyncio.sleep(0.5)  # the listener's socket is open
            status, created = await post(http, server.url + "/sessions", json={"rtmp": url})
            assert status == 201 and created["rtmp"]["url"] == "rtmp://127.0.0.1:" + url.split(":")[2].split("/")[0] \
                + "/live/…", created
            session = next(s for s in server_state(server).sessions if s.session_id == created["id"])
            await wait_exit(first_listener, 60)
            second_listener = rtmp_listener(url, tmp_path / "second.flv")
            await wait_until(lambda: session.rtmp.connections >= 2 and session.rtmp.state == "live", 60,
                             "the push to reconnect")
            await speak_wav(http, server, created["id"], speech, tmp_path)
            await wait_until(lambda: speech_played(session, 1, SPEECH_S), 120, "the speech to play")
            async with http.get(server.url + f"/sessions/{created['id']}") as response:
                listed = (await response.json())["rtmp"]
            assert listed["connections"] >= 2 and listed["last_error"], listed
            async with http.delete(server.url + f"/sessions/{created['id']}") as response:
                assert response.status == 200
            await wait_exit(second_listener, 30)  # the push ended: the listener's stream ends
            assert engine.active_sessions == 0
    finally:
        for listener in (first_listener, second_listener):
            if listener is not None and listener.poll() is None:
                listener.kill()
                listener.wait()
    flv = read_back(str(tmp_path / "second.flv"))
    assert flv["codecs"] == ["aac", "h264"], flv["codecs"]
    assert flv["video_frames"] > 0 and flv["duration_s"] >= SPEECH_S, (flv["video_frames"], flv["duration_s"])
    assert voice_found(speech, flv["audio"]) >= 0.75, "the speech is not in the pushed stream's audio"
    first = read_back(str(tmp_path / "first.flv"))
    assert first["codecs"] == ["aac", "h264"] and first["video_frames"] > 0


async def test_recording_is_a_fragmented_mp4_readable_during_and_after_the_session(speech_pcm, tmp_path):
    cfg = small_cfg(**FAST, **{"server.recording_dir": str(tmp_path / "recordings")})
    speech = speech_pcm[: int(SPEECH_S * RATE_HZ)]
    async with running_server(cfg) as (server, engine), aiohttp.ClientSession() as http:
        status, created = await post(http, server.url + "/sessions", json={"record": True})
        assert status == 201 and created["recording"] == f"/sessions/{created['id']}/recording", created
        session = next(s for s in server_state(server).sessions if s.session_id == created["id"])
        await speak_wav(http, server, created["id"], speech, tmp_path)
        await wait_until(lambda: speech_played(session, 1, SPEECH_S), 120, "the speech to play")
        await asyncio.sleep(1.0)  # the clip after the speech completes its fragment
        async with http.get(server.url + created["recording"]) as response:
            assert response.status == 200 and response.content_type == "video/mp4"
            during = read_back(await response.read())  # a file still being written: its whole fragments play
        async with http.delete(server.url + f"/sessions/{created['id']}") as response:
            assert response.status == 200
        async with http.get(server.url + created["recording"]) as response:
            assert response.status == 200
            after = read_back(await response.read())
        assert engine.active_sessions == 0
    assert during["codecs"] == ["aac", "h264"] and during["video_frames"] > 0
    assert after["codecs"] == ["aac", "h264"] and after["video_frames"] >= during["video_frames"]
    assert after["duration_s"] >= SPEECH_S, after["duration_s"]
    assert voice_found(speech, after["audio"]) >= 0.75, "the speech is not in the recording's audio"
