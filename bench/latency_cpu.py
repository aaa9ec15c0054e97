#!/usr/bin/env python3
"""Audio->video latency and A/V offset of the live path, measured end to end over loopback WebRTC.

    .venv/bin/python bench/latency_cpu.py [--config configs/tiny.yaml] [--steps 4 1] [--frames 12 24]
        [--delivery parts whole] [--seconds 5] [--threads 1] [--set key=value ...]

A client sends espeak-ng speech as its microphone through the real /ws signaling; the server runs the
model through ModelEngine. Per run it prints: when the first frame made from the speech arrived after
that speech was sent (latency), the server's playout delay, the offset between that frame and the
returned voice (A/V offset, + = video late), generation time per clip and to its first part, received
fps and dropped clips. `--frames` sets video.infer_frames per row (default: the config's and twice it;
with the tiny model 12 frames are one denoised block, 24 are two); `--delivery whole` hands each clip to the session only once all its blocks
are done (how the server worked before clips came in parts), for a side-by-side comparison.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import load_config, set_overrides
from model.io_types import VideoClip
from server.engine import ModelEngine
from server.reference_image import drawn_reference, resize_rgb
from tests.server.av_analysis import align_chunks, audio_timeline, first_clip_frame
from tests.server.conftest import SPEECH_TEXT, read_wav_48k_mono, start_server
from tests.server.webrtc_client import LoopbackClient


def speech(seconds: float, audio: str | None = None) -> np.ndarray:
    """`seconds` of the given speech file, or of espeak-ng reading SPEECH_TEXT."""
    if audio:
        return read_wav_48k_mono(Path(audio))[: int(seconds * 48000)]
    with tempfile.TemporaryDirectory() as folder:
        wav = Path(folder) / "speech.wav"
        subprocess.run(["espeak-ng", "-s", "170", "-w", str(wav), SPEECH_TEXT], check=True)
        return read_wav_48k_mono(wav)[: int(seconds * 48000)]


class BenchEngine(ModelEngine):
    """The real engine, counting each clip's parts; with `whole`, a clip reaches the session only when done."""

    def __init__(self, cfg, whole: bool) -> None:
        super().__init__(cfg)
        self.whole = whole
        self.parts_per_clip: dict[int, int] = {}  # of clips whose final part came
        self._parts_so_far: dict[int, int] = {}
        self.made_frames: list[np.ndarray] = []  # every frame the model made (tells clip frames from idle ones)

    async def submit(self, session_id, window, on_part=None) -> VideoClip:
        def count(part: VideoClip) -> None:
            self._parts_so_far[part.clip_index] = self._parts_so_far.get(part.clip_index, 0) + 1
            self.made_frames.append(part.frames)
            if part.final:
                self.parts_per_clip[part.clip_index] = self._parts_so_far[part.clip_index]
            if not self.whole and on_part is not None:
                on_part(part)

        if not self.whole:
            return await super().submit(session_id, window, on_part=count)
        clip = await super().submit(session_id, window)  # next_clip: all blocks, then the clip
        count(clip)
        if on_part is not None:
            on_part(clip)
        return clip


async def measure(cfg, steps: int, pcm: np.ndarray, delivery: str = "parts") -> dict:
    engine = BenchEngine(cfg, whole=delivery == "whole")
    await engine.load()
    server, runner = await start_server(cfg, engine)
    client = LoopbackClient(server.ws_url, pcm, config={"sample_steps": steps})
    try:
        await client.connect()
        speech_s = len(pcm) / 48000
        while True:
            await asyncio.sleep(0.25)
            stats = client.stats()
            if stats and stats[-1]["latency_ms"] is not None and stats[-1]["clips_played"] and \
                    time.monotonic() - client.connected_s > speech_s + stats[-1]["latency_ms"] / 1000 + 1:
                break
            if time.monotonic() - client.connected_s > speech_s + 120:
                raise TimeoutError(f"the speech's clips had not played {speech_s + 120:.0f} s after connecting")
    finally:
        await client.close()
        await runner.cleanup()
        await engine.close()
    fmt = engine.stream_format
    reference = resize_rgb(drawn_reference(), *fmt.frame_size)
    first = first_clip_frame(client.video, reference, np.concatenate(engine.made_frames))
    received, arrival = audio_timeline(client.audio)
    chunks = align_chunks(pcm, received)  # the voice may gain short gaps where the delay steps up
    # When sample 0 came back, from the first chunk that came back whole (a chunk that did not can match a
    # sentence spoken again later in another voice; later chunks may have waited for a raised playout delay)
    opening = next((c for c in chunks if c.peak > 0.8), chunks[0])
    sample0_arrival_s = arrival[opening.lag_samples] - opening.start_samples / 48000
    sent_s = client.mic._start_s  # wall time the first speech sample was handed to WebRTC
    stats = client.stats()
    generation = [s["generation_ms"] for s in stats if s["generation_ms"] is not None]
    first_part = [s["first_part_ms"] for s in stats if s.get("first_part_ms") is not None]
    steady = client.video[len(client.video) // 4:]
    return {
        "steps": steps,
        "frames": cfg.video.infer_frames,
        "parts": max(engine.parts_per_clip.values(), default=0),
        "delivery": delivery,
        "first_part_ms": float(np.median(first_part)) if first_part else float("nan"),
        "latency_ms": (first.arrival_s - sent_s) * 1000,
        "playout_delay_ms": stats[-1]["latency_ms"],
        "av_offset_ms": (first.arrival_s - sample0_arrival_s) * 1000,
        "voice_match": float(np.median([c.peak for c in chunks])),
        "generation_ms": float(np.median(generation)),
        "generation_max_ms": float(np.max(generation)),
        "over_clip": int(sum(g > stats[-1]["clip_ms"] for g in generation)),
        "clip_ms": stats[-1]["clip_ms"],
        "fps": (len(steady) - 1) / (steady[-1].arrival_s - steady[0].arrival_s),
        "clips": f"{stats[-1]['clips_done']} done / {stats[-1]['clips_dropped']} dropped",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 1])
    parser.add_argument("--frames", type=int, nargs="+", default=None,
                        help="video.infer_frames per row (default: the config's and twice it; tiny model: "
                             "12 = one block per clip, 24 = two)")
    parser.add_argument("--delivery", choices=["parts", "whole"], nargs="+", default=["parts"],
                        help="parts: each block's frames leave as soon as they exist; whole: the clip at once")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any config key, e.g. --set video.size=64*64 (repeatable)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--audio", default=None, help="a speech WAV to send instead of espeak-ng's sentence "
                        "(e.g. minutes of held-out speech: python -m training.long_stream's voices)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the model (runtime.num_threads)")
    args = parser.parse_args()
    overrides = {"runtime.num_threads": args.threads, **set_overrides(args.overrides)}
    pcm = speech(args.seconds, args.audio)
    rows = []
    frames_per_clip = load_config(args.config, overrides).video.infer_frames
    for frames in args.frames or [frames_per_clip, 2 * frames_per_clip]:
        cfg = load_config(args.config, {**overrides, "video.infer_frames": frames})
        for delivery in args.delivery:
            rows += [asyncio.run(measure(cfg, steps, pcm, delivery)) for steps in args.steps]
    print(f"\nlive path, {cfg.model.preset} model, {cfg.video.size} at {cfg.video.fps:g} fps, "
          f"{args.seconds:g} s of speech, {args.threads} torch thread(s), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    header = ("frames/clip", "parts/clip", "delivery", "steps", "first frame after speech ms", "playout delay ms",
              "A/V offset ms", "voice match", "generation ms/clip (max, over clip length)", "first part ms", "clip ms",
              "fps", "clips")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(f"{r['frames']} | {r['parts']} | {r['delivery']} | {r['steps']} | {r['latency_ms']:.0f} | "
              f"{r['playout_delay_ms']:.0f} | {r['av_offset_ms']:+.1f} | {r['voice_match']:.2f} | "
              f"{r['generation_ms']:.0f} ({r['generation_max_ms']:.0f}, {r['over_clip']}) | {r['first_part_ms']:.0f} | {r['clip_ms']:.0f} | {r['fps']:.2f} | "
              f"{r['clips']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
