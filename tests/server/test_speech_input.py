"""Speech for the sessions API: every audio format a bot sends decodes to the same speech; the queue takes it in
order, pads, clears and notes where utterances start; speech mixes into a microphone's frames on its clock."""
from __future__ import annotations

import fractions
import io

import av
import numpy as np
import pytest

from server.speech_input import FRAME_SAMPLES, RATE_HZ, SpeechError, SpeechInput, SpeechQueue, decode_speech
from tests.server.av_analysis import align

FORMATS = [("wav", "pcm_s16le", 48000), ("mp3", "libmp3lame", 44100), ("ogg", "libopus", 48000),
           ("ipod", "aac", 44100), ("flac", "flac", 48000)]  # ipod = m4a


def encode(pcm: np.ndarray, container_format: str, codec: str, rate_hz: int) -> bytes:
    """`pcm` (48 kHz mono int16) as a file of `container_format`, written with av."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate_hz, layout="mono")
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=rate_hz)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE_HZ, 0, fractions.Fraction(1, RATE_HZ)
        for out in resampler.resample(frame) + resampler.resample(None):
            out.pts = None
            container.mux(stream.encode(out))
        container.mux(stream.encode(None))
    return buffer.getvalue()


@pytest.mark.parametrize(("container_format", "codec", "rate_hz"), FORMATS)
def test_every_audio_format_decodes_to_the_speech(speech_pcm, container_format, codec, rate_hz):
    speech = speech_pcm[: 2 * RATE_HZ]
    decoded = decode_speech(encode(speech, container_format, codec, rate_hz), max_s=60)
    assert decoded.dtype == np.int16 and abs(len(decoded) - len(speech)) < 0.1 * RATE_HZ, len(decoded)
    found = align(speech[RATE_HZ // 2: RATE_HZ], decoded.astype(np.float64))
    assert found.peak > 0.9, (container_format, found)


def test_bad_bodies_are_refused_naming_the_problem(speech_pcm):
    with pytest.raises(SpeechError, match="empty") as empty:
        decode_speech(b"", max_s=60)
    assert empty.value.code == "empty_body"
    for body in (b"not audio" * 100, b"\x89PNG\r\n\x1a\n" + bytes(500)):
        with pytest.raises(SpeechError) as bad:
            decode_speech(body, max_s=60)
        assert bad.value.code == "bad_audio"
    with pytest.raises(SpeechError, match="max_speech_s") as long:
        decode_speech(encode(speech_pcm[: 2 * RATE_HZ], "wav", "pcm_s16le", 48000), max_s=1.0)
    assert long.value.code == "speech_too_long"


def test_the_queue_speaks_in_order_pads_and_clears():
    queue = SpeechQueue(max_queued_s=1.0)
    first, second = np.full(1000, 7, np.int16), np.full(500, 9, np.int16)
    assert queue.add(first) == 0.0 and queue.add(second) == pytest.approx(1000 / RATE_HZ)
    taken = queue.take(1200, stream_s=2.0)
    assert (taken[:1000] == 7).all() and (taken[1000:] == 9).all()
    assert list(queue.starts_s) == [2.0, pytest.approx(2.0 + 1000 / RATE_HZ)]  # where each utterance began
    rest = queue.take(1200, stream_s=2.025)
    assert (rest[:300] == 9).all() and (rest[300:] == 0).all() and queue.utterances_spoken == 2
    assert queue.take(10) is None  # nothing queued: the feeder sends silence
    with pytest.raises(SpeechError, match="max_speech_s") as full:
        queue.add(np.zeros(RATE_HZ + 1, np.int16))
    assert full.value.code == "speech_queue_full"
    queue.add(first)
    assert queue.clear() == pytest.approx(1000 / RATE_HZ) and not queue.speaking


def test_speech_mixes_into_a_microphone_on_its_clock():
    speech_input = SpeechInput(max_queued_s=10)
    speech_input.queue.add(np.full(FRAME_SAMPLES + 100, 1000, np.int16))
    mic = av.AudioFrame.from_ndarray(np.full((1, 2 * FRAME_SAMPLES), 10, np.int16), format="s16", layout="stereo")
    mic.sample_rate, mic.pts, mic.time_base = RATE_HZ, 4800, fractions.Fraction(1, RATE_HZ)
    mixed = speech_input.mix(mic)
    pcm = mixed.to_ndarray().reshape(-1)
    assert mixed.pts == 4800 and len(pcm) == FRAME_SAMPLES
    assert abs(int(pcm[0]) - 1010) <= 2  # the speech on top of the microphone
    assert speech_input.utterance_starts_s[-1] == pytest.approx(0.1) and speech_input.fed_until_s == pytest.approx(0.12)
