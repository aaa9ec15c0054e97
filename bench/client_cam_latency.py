"""Latency and A/V offset through client_cam on loopback: the tiny model's server and the client in one process.

    python bench/client_cam_latency.py [--runs 3] [--speech-text "..."]

Per run: espeak-ng speech goes out through client_cam's file microphone, the avatar and the returned voice come
back through its connection into its MP4 recorder (the timeline the camera and the microphone get). Prints:
- mouth->ear latency: from the speech's first sample handed to the sender to that sample in the output;
- the server's audio->video latency when the speech's first clip played (its stats, what the status line shows),
  and what the path around it adds (mouth->ear minus that: network, jitter buffers, decoding, the client);
- A/V offset in the output: clip 0's first frame minus the speech's first sample (> 0: video after voice).
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client_cam.connection import Connection, LiveState
from client_cam.media_in import FileAudioTrack
from client_cam.output import AvatarOutput
from client_cam.signaling import ServerLink
from model.config import load_config
from server.engine import ModelEngine
from server.reference_image import drawn_reference, resize_rgb
from server.tracks import AvatarVideoTrack
from tests.client_cam.test_client_cam import read_mp4
from tests.server.av_analysis import align_chunks, first_clip_frame
from tests.server.conftest import read_wav_48k_mono, start_server

RATE_HZ = 48000
TEXT = "Hello there. This is a test of the live avatar camera. The avatar moves its lips."


def speech_file(folder: Path, text: str) -> Path:
    raw = folder / "speech.wav"
    subprocess.run([shutil.which("espeak-ng"), "-s", "170", "-w", str(raw), text], check=True)
    return raw


async def one_run(server, engine, speech: Path, folder: Path, parts: list) -> dict:
    parts.clear()
    out = folder / "run.mp4"
    speech_pcm = read_wav_48k_mono(speech)
    speech_s = len(speech_pcm) / RATE_HZ
    output = AvatarOutput(None, False, str(out))
    state = LiveState()
    mic = FileAudioTrack(speech)
    async with aiohttp.ClientSession() as http:
        connection = Connection(ServerLink(server.url, None), http, mic, output, state,
                                {"reference": None, "prompt": None, "sample_steps": None}, lambda text: None)
        task = asyncio.create_task(connection.run())
        first_latency_ms = None
        while True:
            await asyncio.sleep(0.1)
            latency_ms = state.server_stats.get("latency_ms")
            first_latency_ms = first_latency_ms or latency_ms
            if mic.started_s and latency_ms and time.monotonic() - mic.started_s > speech_s + latency_ms / 1000 + 1.5:
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    recording_start_s = output.started_s
    await output.close()
    fmt = engine.stream_format
    recording = read_mp4(out)
    opening = next(c for c in align_chunks(speech_pcm[:round(fmt.frames_per_clip / fmt.fps * RATE_HZ)],
                                           recording.audio, 0.125) if c.peak > 0.8)
    sample0_s = (opening.lag_samples - opening.start_samples) / RATE_HZ
    clip0 = np.concatenate([p.frames for p in parts if p.clip_index == 0])
    first = first_clip_frame(recording.video, resize_rgb(drawn_reference(), *fmt.frame_size), clip0)
    return {"mouth_to_ear_ms": (recording_start_s + sample0_s - mic.started_s) * 1000,
            "server_latency_ms": first_latency_ms,
            "av_offset_ms": (first.arrival_s - sample0_s) * 1000}


async def main(runs: int, text: str) -> None:
    parts: list = []
    add_clip = AvatarVideoTrack.add_clip

    def recording_add_clip(track, clip):  # the frames the model made, to tell clip 0 from idle frames
        add_clip(track, clip)
        parts.append(clip)

    AvatarVideoTrack.add_clip = recording_add_clip
    cfg = load_config(None)
    engine = ModelEngine(cfg)
    await engine.load()
    server, runner = await start_server(cfg, engine)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            speech = speech_file(Path(tmp), text)
            for index in range(runs):
                result = await one_run(server, engine, speech, Path(tmp), parts)
                around_ms = result["mouth_to_ear_ms"] - result["server_latency_ms"]
                print(f"run {index + 1}: mouth->ear {result['mouth_to_ear_ms']:.0f} ms = server audio->video "
                      f"{result['server_latency_ms']:.0f} ms + {around_ms:.0f} ms around it, A/V offset "
                      f"{result['av_offset_ms']:+.1f} ms", flush=True)
    finally:
        await runner.cleanup()
        await engine.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--speech-text", default=TEXT)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.speech_text))
