#!/usr/bin/env python3
"""Speak-to-first-frame latency and A/V offset of the sessions API, watched over WHEP.

    .venv/bin/python bench/speak_latency.py [--config configs/tiny.yaml] [--runs 3] [--seconds 3]
        [--threads 2] [--set key=value ...]

A server with the real model; `POST /sessions`, one aiortc WHEP viewer, then per run `POST .../speak` with
espeak-ng speech as a WAV. Latency: from the POST to the arrival at the viewer of the first spoken sample
(the returned voice, found by cross-correlation); the frames made for it arrive with it (A/V offset: the
median over the speech's frames of a frame's arrival minus the arrival of the voice at that frame's stream
time, + = video late). Also printed: the session's playout delay, generation per clip, load average.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import load_config, set_overrides
from model.io_types import VideoClip
from server.reference_image import drawn_reference, resize_rgb
from server.tracks import AvatarVideoTrack
from tests.server.av_analysis import align, audio_timeline, av_offsets, made_frames_between
from tests.server.conftest import SPEECH_TEXT, read_wav_48k_mono, write_wav
from tests.server.reliability_support import running_server, server_state
from tests.server.webrtc_client import WhepClient

RATE_HZ = 48000


def speech(seconds: float, folder: Path) -> tuple[np.ndarray, bytes]:
    raw = folder / "espeak.wav"
    subprocess.run(["espeak-ng", "-s", "170", "-w", str(raw), SPEECH_TEXT], check=True)
    pcm = read_wav_48k_mono(raw)[: int(seconds * RATE_HZ)]
    path = folder / "speech.wav"
    write_wav(path, pcm, RATE_HZ)
    return pcm, path.read_bytes()


async def run(cfg, runs: int, seconds: float) -> list[dict]:
    parts: list[VideoClip] = []
    add_clip = AvatarVideoTrack.add_clip

    def recording_add_clip(track: AvatarVideoTrack, clip: VideoClip) -> None:
        add_clip(track, clip)
        parts.append(clip)

    AvatarVideoTrack.add_clip = recording_add_clip
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        pcm, wav = speech(seconds, Path(folder))
        async with running_server(cfg) as (server, engine), aiohttp.ClientSession() as http:
            async with http.post(server.url + "/sessions", json={}) as response:
                created = await response.json()
            session = next(s for s in server_state(server).sessions if s.session_id == created["id"])
            viewer = WhepClient(server.url + created["whep"])
            await viewer.connect()
            reference = resize_rgb(drawn_reference(), *engine.stream_format.frame_size)
            try:
                await asyncio.sleep(3.0)  # the stream is up and the model has made a few silent clips
                for _ in range(runs):
                    posted_s = time.monotonic()
                    async with http.post(server.url + f"/sessions/{created['id']}/speak", data=wav,
                                         headers={"Content-Type": "audio/wav"}) as response:
                        assert response.status == 202, await response.text()
                    while len(session.speech.utterance_starts_s) <= len(rows):
                        await asyncio.sleep(0.05)
                    start_s = session.speech.utterance_starts_s[-1]
                    deadline_s = time.monotonic() + 180
                    while True:  # until the speech has played out and its opening has reached the viewer
                        await asyncio.sleep(0.5)
                        if (session.clock.stream_time_at(time.monotonic()) or 0) < start_s + seconds + 1.0:
                            continue
                        received, arrival = audio_timeline(viewer.audio)
                        since = int(np.argmax(np.nan_to_num(arrival, nan=-1.0) > posted_s))  # this run's audio
                        opening = align(pcm[: RATE_HZ // 4], received[since:])
                        if opening.peak > 0.8 or time.monotonic() > deadline_s:
                            break
                    first_s = arrival[since + opening.lag_samples]
                    # this run only: the same speech was spoken (and its frames made) in the runs before
                    every, every_t = made_frames_between(parts, start_s - 1.0, float("inf"))
                    offsets = av_offsets([v for v in viewer.video if v.arrival_s > posted_s], every, every_t, pcm,
                                         start_s, received[since:], arrival[since:], reference)
                    stats = session.stats()
                    rows.append({"latency_ms": (first_s - posted_s) * 1000, "peak": opening.peak,
                                 "av_offset_ms": float(np.median(offsets)) * 1000 if offsets else None,
                                 "frames_timed": len(offsets), "delay_ms": stats["latency_ms"],
                                 "generation_ms": stats["generation_ms"], "clip_ms": stats["clip_ms"]})
                    print(rows[-1], flush=True)
            finally:
                await viewer.close()
    AvatarVideoTrack.add_clip = add_clip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="speech per run")
    parser.add_argument("--threads", type=int, default=2, help="runtime.num_threads")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    args = parser.parse_args()
    overrides = {"runtime.num_threads": args.threads, **set_overrides(args.set)}
    cfg = load_config(args.config, overrides)
    rows = asyncio.run(run(cfg, args.runs, args.seconds))
    rows = [r for r in rows if r["peak"] > 0.8]  # a run whose speech never came back has no latency
    latency = [r["latency_ms"] for r in rows] or [float("nan")]
    offsets = [r["av_offset_ms"] for r in rows if r["av_offset_ms"] is not None]
    print(f"{cfg.model.preset} {cfg.video.size} {cfg.video.infer_frames} frames/clip, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}: speak -> first spoken frame over WHEP median {np.median(latency):.0f} ms "
          f"(min {min(latency):.0f}, max {max(latency):.0f}); A/V offset median "
          f"{np.median(offsets) if offsets else float('nan'):+.0f} ms over {len(offsets)} runs")


if __name__ == "__main__":
    main()
