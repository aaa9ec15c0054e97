"""Lip sync through the live WebRTC path: held-out speech in over aiortc, the avatar's frames back, scored.

The client sends a held-out speaker's voice as its microphone and the held-out face as its reference
image. What a viewer sees is judged against what they hear: every received voice sample is labelled
with the stream time it carried, from the server's own playout clock (`tests/server/stream_labels.py`;
the labels are checked against the content: at its labels the received voice must be the sent voice),
so for every model frame k we take the video frame on screen when the viewer hears the middle of the
audio that frame k was made for, and score those frames with `training.lip_sync_check.score_video`
(the offline metric). The same samples generated offline (`StreamingAvatar`, no network) are scored
too, so a live path that loses sync shows up as a gap between the two, not only as a low number.
"""
from __future__ import annotations

import base64
import fractions
import io

import av
import numpy as np
import pytest
from PIL import Image

from evaluation.metrics import LipSyncScore
from model.config import AppConfig, load_config
from model.stream.avatar import AvatarModels, StreamingAvatar
from server.tracks import AvatarVideoTrack
from tests.server.av_analysis import RATE_HZ
from tests.server.conftest import start_server
from tests.server.stream_labels import HeardVoice, label_received_voice, log_sent_voice
from tests.server.webrtc_client import LoopbackClient, run_client
from training.lip_sync_check import LipSyncReport, cut_sample, generate_frames, score_video
from training.talking_dataset import TalkingSample, make_sample

pytestmark = pytest.mark.timeout(240)

SAMPLES = (0, 1)  # held-out speakers/identities; 1 is the weakest of the first four offline
CLIPS = 8  # 6 s of speech each
LIVE_MIN_CORRELATION = 0.6  # issue 5: the live path stays >= 0.6 ...
LIVE_MAX_LAG_FRAMES = 1  # ... with the best lag within one frame
LIVE_VS_OFFLINE_SLACK = 0.1  # the network path may cost a little (Opus, VP8, frame phase), not more
# At its labels the returned voice is the sent voice: each voiced 0.25 s, through Opus both ways, correlates
# 0.72-0.96 with the sent speech (median 0.88-0.92 over 5 runs); with the labels moved half a frame (31 ms) the
# median falls to 0.16-0.29, a whole frame to ~0.1.
VOICE_MIN_MEDIAN_NCC = 0.8
VOICE_MIN_P10_NCC = 0.6


def to_48k_int16(audio: np.ndarray, rate_hz: int) -> np.ndarray:
    """Model-rate float speech -> 48 kHz int16 mono, what a browser microphone hands to WebRTC."""
    frame = av.AudioFrame.from_ndarray(audio.astype(np.float32).reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = rate_hz
    frame.pts = 0
    frame.time_base = fractions.Fraction(1, rate_hz)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE_HZ)
    chunks = [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
    chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.int16)


def png_data_url(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


async def receive_live(server, pcm: np.ndarray, reference: np.ndarray, until_s: float = 60.0) -> LoopbackClient:
    """Send the speech as the mic (then silence) until its last second has come back, keeping every frame."""
    return await run_client(server, pcm, until_s, config={"reference_image": png_data_url(reference)})


def frames_seen_per_model_frame(client: LoopbackClient, voice: HeardVoice, num_frames: int,
                                fps: float) -> np.ndarray:
    """For model frame k: the received video frame on screen when the viewer hears stream time (k + 1/2) / fps."""
    video_arrival_s = np.array([v.arrival_s for v in client.video])
    assert np.all(np.diff(video_arrival_s) >= 0), "video frames must arrive in order"
    frames = []
    for k in range(num_frames):
        wall_s = voice.heard_at((k + 0.5) / fps)
        shown = int(np.searchsorted(video_arrival_s, wall_s, side="right")) - 1
        assert shown >= 0, f"no video had arrived when frame {k}'s audio played"
        frames.append(client.video[shown].rgb)
    return np.stack(frames)


def near_zero(score: LipSyncScore) -> float:
    return max(score.correlation_by_lag[lag] for lag in (-1, 0, 1))


def describe(report: LipSyncReport) -> str:
    s = report.lip_sync
    return (f"corr lag0 {s.correlation_at_zero:.3f}, best of -1..1 {near_zero(s):.3f}, best lag "
            f"{s.best_lag_frames:+d} ({s.best_correlation:.3f}), PSNR {report.identity.psnr_db:.1f} dB")


@pytest.fixture(scope="module")
def live_cfg() -> AppConfig:
    """The tiny default with a deep clip queue: on a busy 2-core machine generation may fall behind real
    time for a while; then the playout delay grows instead of clips being dropped, so what is measured is
    the sync of the live path, not the spare CPU of the machine the suite runs on."""
    return load_config(None, {"server.max_sessions": 1, "server.stats_interval_s": 0.5,
                              "server.max_pending_clips": 32})


@pytest.fixture
async def live_engine(live_cfg: AppConfig):
    from server.engine import ModelEngine

    engine = ModelEngine(live_cfg)
    await engine.load()
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
def heldout(live_cfg) -> list[TalkingSample]:
    frames = CLIPS * live_cfg.video.infer_frames
    return [cut_sample(make_sample("heldout", i, live_cfg.video.width, live_cfg.video.fps,
                                   live_cfg.audio_sample_rate_hz), frames) for i in SAMPLES]


@pytest.fixture(scope="module")
def offline_reports(live_cfg, heldout) -> list[LipSyncReport]:
    """The same samples through `StreamingAvatar` directly: what the model reaches without the network."""
    avatar = StreamingAvatar(AvatarModels.load(live_cfg), live_cfg)
    return [score_video(generate_frames(avatar, s.reference, s.audio, live_cfg.server.prompt),
                        s.opening, s.mouth_box, s.reference) for s in heldout]


async def test_live_video_follows_heldout_speech(live_engine, live_cfg, heldout, offline_reports, monkeypatch):
    fps = live_cfg.video.fps
    generated: list = []  # every clip part the session queued for playout, as the video track got it
    add_clip = AvatarVideoTrack.add_clip
    monkeypatch.setattr(AvatarVideoTrack, "add_clip", lambda track, clip: (generated.append(clip), add_clip(track, clip)))
    sent_voice = log_sent_voice(monkeypatch)
    live_reports, made_reports, notes = [], [], []
    for sample in heldout:
        generated.clear()
        sent_voice.clear()
        pcm = to_48k_int16(sample.audio, sample.sample_rate_hz)
        server, runner = await start_server(live_cfg, live_engine)
        try:
            client = await receive_live(server, pcm, sample.reference)
        finally:
            await runner.cleanup()
        assert not client.errors(), client.errors()
        last = client.stats()[-1]
        assert last["clips_dropped"] == 0, last
        latencies = [s["latency_ms"] for s in client.stats() if s["latency_ms"] is not None]
        voice = label_received_voice(client.audio, sent_voice, pcm)
        assert len(voice.chunk_ncc) >= 10, voice.chunk_ncc
        assert np.median(voice.chunk_ncc) >= VOICE_MIN_MEDIAN_NCC, voice.chunk_ncc
        assert np.percentile(voice.chunk_ncc, 10) >= VOICE_MIN_P10_NCC, voice.chunk_ncc
        notes.append(f"playout delay {latencies[0]:.0f} -> {latencies[-1]:.0f} ms over {last['clips_played']} clips; "
                     f"voice at its labels: ncc median {np.median(voice.chunk_ncc):.2f}, 10th pct "
                     f"{np.percentile(voice.chunk_ncc, 10):.2f}, min {voice.chunk_ncc.min():.2f} over "
                     f"{len(voice.chunk_ncc)} chunks, lag {voice.content_lag}, "
                     f"clock back-step {1000 * voice.backstep_s:.0f} ms")
        made = np.zeros_like(sample.frames)
        for part in generated:
            first = round(part.t0 * fps)
            count = max(0, min(len(part.frames), len(made) - first))
            made[first:first + count] = part.frames[:count]
        made_reports.append(score_video(made, sample.opening, sample.mouth_box, sample.reference))
        frames = frames_seen_per_model_frame(client, voice, len(sample.opening), fps)
        live_reports.append(score_video(frames, sample.opening, sample.mouth_box, sample.reference))

    table = "\n".join(f"held-out {i}: viewer {describe(live)} | generated live {describe(made)} | "
                      f"offline {describe(off)} | {note}"
                      for i, live, made, off, note in zip(SAMPLES, live_reports, made_reports, offline_reports, notes,
                                                         strict=True))
    print(table)
    # The model behind the live session (Opus-coded speech, windows cut on the RTP clock) keeps its lip sync.
    for made, off in zip(made_reports, offline_reports, strict=True):
        assert near_zero(made.lip_sync) >= near_zero(off.lip_sync) - LIVE_VS_OFFLINE_SLACK, table
        assert abs(made.lip_sync.best_lag_frames) <= LIVE_MAX_LAG_FRAMES, table
    # What the viewer sees against what they hear: issue 5's live target.
    for live in live_reports:
        assert near_zero(live.lip_sync) >= LIVE_MIN_CORRELATION, table
        assert abs(live.lip_sync.best_lag_frames) <= LIVE_MAX_LAG_FRAMES, table
