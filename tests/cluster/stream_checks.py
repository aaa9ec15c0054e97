"""What each cluster test client must have received: the avatar's frames and its own voice back.

The replicas run in other processes, so the frames they made cannot be recorded as the loopback test does;
the server's own stats say how many clip frames it sent, and the client checks what arrived.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

from tests.server.av_analysis import align_pieces, audio_timeline
from tests.server.webrtc_client import LoopbackClient

RATE_HZ = 48000


def speech_done(speech_s: float) -> Callable[[LoopbackClient, float], bool]:
    """A `done(client, elapsed_s)` for run_client that waits for progress, not for a time: every clip of the
    speech played (or dropped, its time then passing with idle frames and the voice), then the playout delay
    and a clip more, so the voice of the last clip is out. A replica slower than real time (one core for
    the tiny model) makes the delay grow during the session; a fixed wait would cut its end off."""
    reached: dict[str, float] = {}

    def done(client: LoopbackClient, elapsed_s: float) -> bool:
        stats = client.stats()
        if not stats:
            return False
        last = stats[-1]
        if "at" not in reached:
            if last["clips_played"] + last["clips_dropped"] < math.ceil(speech_s * 1000 / last["clip_ms"]):
                return False
            reached["at"] = elapsed_s
        wait_s = (last["latency_ms"] or 0) / 1000 + last["clip_ms"] / 1000 + 1.0
        return elapsed_s - reached["at"] > wait_s

    return done


def check_frames_and_voice(client: LoopbackClient, speech_pcm: np.ndarray, fps: float, frames_per_clip: int) -> None:
    """Frames of one size on a whole-frame clock, at least a clip of them made by the model, and the voice."""
    video = client.video
    assert len(video) > fps, f"only {len(video)} video frames arrived"
    assert len({v.rgb.shape for v in video}) == 1, "frames changed size"
    pts = np.array([v.pts for v in video])
    assert np.all(np.diff(pts) > 0), "video pts must increase"
    assert np.all(np.diff(pts) % round(90000 / fps) == 0), "pts steps must be whole frames of 90 kHz"
    stats = client.stats()
    assert stats, "no stats arrived from the replica"
    assert max(s["clip_frames_sent"] for s in stats) >= frames_per_clip, "no whole clip of model frames was sent"
    assert max(s["clips_played"] for s in stats) >= 1

    pcm, _ = audio_timeline(client.audio)
    pieces = align_pieces(speech_pcm, pcm)
    found = [p for p in pieces if p.peak > 0.8]
    voiced_s = sum(p.samples for p in pieces) / RATE_HZ
    found_s = sum(p.samples for p in found) / RATE_HZ
    summary = [(p.start_samples / RATE_HZ, round(p.peak, 2)) for p in pieces]
    assert voiced_s >= 1.0, f"only {voiced_s:.2f} s of voiced speech in the test speech"
    assert found_s >= 0.9 * voiced_s, f"only {found_s:.2f} of {voiced_s:.2f} s of the voice came back: {summary}"
    assert all(b.lag_samples > a.lag_samples for a, b in itertools.pairwise(found)), "voice came back out of order"
