"""Which stream time each returned-voice sample carried, from the server's own playout clock.

A viewer's check needs, for every wall time, which stream time they hear. Finding it from the voice
alone fails where the returned voice is quiet: when generation is slower than real time it comes back
in runs with pauses, and a run with no voiced chunk gives no clue where it sits. The server knows: its
audio track asks the session's `PlayoutClock` which stream time plays at each sample's wall time. We
log that answer (the clock's public `stream_times_at`, asked at the same instant with the same wall
times as the track) next to each outgoing frame's pts, find where the outgoing audio sits in the
received audio (one cross-correlation of the two: codec delay and RTP origin), and so label every
received sample with its stream time. The labels are then checked against the content: at its labels,
the received voice must be the sent voice, chunk by chunk, so a server that sent the wrong audio while
its clock claimed the right time fails the check instead of passing it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from server.tracks import AUDIO_OUT_RATE_HZ, AUDIO_PTIME_S, SyncedAudioTrack
from tests.server.av_analysis import RATE_HZ, audio_timeline
from tests.server.webrtc_client import ReceivedAudio

assert AUDIO_OUT_RATE_HZ == RATE_HZ  # the returned voice and the client's timeline share one sample clock


@dataclass
class SentVoiceLog:
    """Every frame the server's returned-voice track sent: pts, samples, and the stream time of each sample."""

    frames: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)  # (pts, int16 pcm, stream s)

    def clear(self) -> None:
        self.frames.clear()

    def timeline(self) -> tuple[np.ndarray, np.ndarray]:
        """Sent pcm and stream time (NaN before the first clip set the delay) placed by pts, as `audio_timeline`."""
        end = max(pts + len(pcm) for pts, pcm, _ in self.frames)
        pcm_out = np.zeros(end, dtype=np.float64)
        stream_s = np.full(end, np.nan)
        for pts, pcm, times in self.frames:
            pcm_out[pts:pts + len(pcm)] = pcm
            stream_s[pts:pts + len(pcm)] = times
        return pcm_out, stream_s


def log_sent_voice(monkeypatch) -> SentVoiceLog:
    """Record what every `SyncedAudioTrack` sends (for the rest of the test)."""
    log = SentVoiceLog()
    next_samples, recv = SyncedAudioTrack._next_samples, SyncedAudioTrack.recv
    pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    samples = round(AUDIO_PTIME_S * AUDIO_OUT_RATE_HZ)

    def logged_next_samples(track: SyncedAudioTrack, wall_s: float) -> np.ndarray:
        # the clock's answer for each sample's wall time, asked just before the track asks it (nothing runs between)
        times = track._clock.stream_times_at(wall_s + np.arange(samples) / AUDIO_OUT_RATE_HZ)
        pcm = next_samples(track, wall_s)
        pending[id(track)] = (pcm.copy(), np.full(len(pcm), np.nan) if times is None else np.asarray(times, float))
        return pcm

    async def logged_recv(track: SyncedAudioTrack):
        frame = await recv(track)
        pcm, times = pending.pop(id(track))
        log.frames.append((frame.pts, pcm, times))
        return frame

    monkeypatch.setattr(SyncedAudioTrack, "_next_samples", logged_next_samples)
    monkeypatch.setattr(SyncedAudioTrack, "recv", logged_recv)
    return log


def best_lag(a: np.ndarray, b: np.ndarray, max_lag: int) -> tuple[int, float]:
    """The lag L in [-max_lag, max_lag] at which b[i + L] best matches a[i], and the normalised correlation there."""
    n = 1 << int(np.ceil(np.log2(len(a) + len(b) + 1)))
    corr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)  # corr[L % n] = sum_i a[i] b[i + L]
    lags = np.arange(-max_lag, max_lag + 1)
    lag = int(lags[int(np.argmax(corr[lags % n]))])
    lo, hi = max(0, -lag), min(len(a), len(b) - lag)
    denom = np.linalg.norm(a[lo:hi]) * np.linalg.norm(b[lo + lag:hi + lag]) if hi > lo else 0.0
    return lag, float(corr[lag % n] / denom) if denom > 0 else 0.0


@dataclass(frozen=True)
class HeardVoice:
    """The received voice with the stream time of every sample (NaN where none played) and its arrival time."""

    pcm: np.ndarray
    stream_s: np.ndarray
    arrival_s: np.ndarray
    pts_offset: int  # received pts - sent pts (codec delay and RTP origin of the server -> viewer leg)
    content_lag: int  # samples by which the received voice trails the sent speech at its labels (mic leg codec)
    chunk_ncc: np.ndarray  # each voiced 0.25 s of sent speech against the received voice at its labels
    backstep_s: float  # the largest step back of the clock's answers (waited out by the track)

    def heard_at(self, stream_s: float) -> float:
        """Wall time at which the viewer hears stream time `stream_s` (the first sample that reaches it)."""
        reached = np.flatnonzero(np.nan_to_num(self.stream_s, nan=-np.inf) >= stream_s)
        assert len(reached), f"stream time {stream_s:.3f} s never came back"
        assert not np.isnan(self.arrival_s[reached[0]]), f"the audio carrying {stream_s:.3f} s never arrived"
        return float(self.arrival_s[reached[0]])


def label_received_voice(received: list[ReceivedAudio], log: SentVoiceLog, sent_pcm: np.ndarray,
                         max_offset_s: float = 0.5, max_content_lag_s: float = 0.04,
                         chunk_s: float = 0.25, slack_s: float = 0.006) -> HeardVoice:
    """Stream time of every received sample, from the server's log, checked against the sent speech."""
    pcm, arrival = audio_timeline(received)
    sent_out, sent_stream_s = log.timeline()
    offset, peak = best_lag(sent_out, pcm, round(max_offset_s * RATE_HZ))
    assert peak > 0.8, f"the received voice is not what the server sent (peak correlation {peak:.2f})"
    index = np.arange(len(pcm)) - offset
    inside = (index >= 0) & (index < len(sent_stream_s))
    stream_s = np.full(len(pcm), np.nan)
    stream_s[inside] = sent_stream_s[index[inside]]
    # The clock answers for the pacer's due wall times; when the loop runs late and a stall ends (`_settle`) the
    # answer can fall behind the last one by that lateness. The track does not replay then: its cursor waits in
    # silence until the clock is back (SyncedAudioTrack._next_samples), so what plays is the running maximum.
    finite = ~np.isnan(stream_s)
    backstep_s = float(-np.diff(stream_s[finite]).min(initial=0.0))
    stream_s[finite] = np.maximum.accumulate(stream_s[finite])
    # The voice the labels promise: the sent speech at each sample's stream time, silence where the stream stood.
    sent = sent_pcm.astype(np.float64)
    position = np.round(np.nan_to_num(stream_s, nan=-1.0) * RATE_HZ).astype(np.int64)
    moving = np.r_[False, np.diff(position) > 0] & (position >= 0) & (position < len(sent))
    promised = np.where(moving, sent[np.clip(position, 0, len(sent) - 1)], 0.0)
    content_lag, _ = best_lag(promised, pcm, round(max_content_lag_s * RATE_HZ))
    # Chunk by chunk, within the track's few ms of slack: its read cursor follows the clock to within
    # `tolerance_s` (5 ms), and a fraction of a millisecond already turns this speech's correlation around.
    slack = round(slack_s * RATE_HZ)
    size = round(chunk_s * RATE_HZ)
    loud = np.sqrt(np.mean(sent ** 2))
    nccs = []
    for start in range(slack + max(0, -content_lag), len(promised) - size - slack - max(0, content_lag), size):
        playing = moving[start:start + size]
        want = promised[start:start + size][playing]
        if playing.mean() < 0.5 or np.sqrt(np.mean(want ** 2)) < 0.3 * loud:
            continue  # mostly a stall, or a pause: nothing to check here
        want = want - want.mean()
        best = -1.0
        for shift in range(-slack, slack + 1, 4):
            got = pcm[start + content_lag + shift:start + content_lag + shift + size][playing]
            got = got - got.mean()
            denom = np.linalg.norm(want) * np.linalg.norm(got)
            best = max(best, float((want * got).sum() / denom) if denom > 0 else 0.0)
        nccs.append(best)
    return HeardVoice(pcm, stream_s, arrival, offset, content_lag, np.array(nccs), backstep_s)
