"""Varied speech for training and acceptance: two synthesizers, many voices, voice and room changes, the browser's codec.

A voice is `espeak:<name>` (espeak-ng with a variant, e.g. `espeak:en-us+m3`) or `flite:<name>` (CMU Flite,
another synthesizer). Each utterance then gets a voice change (sox: pitch, tempo, formants), and what the
model hears gets a room (reverb, room noise) and, most of the time, the Opus round trip the browser path
applies (av's libopus at a WebRTC bit rate). The mouth follows the changed dry voice (`clean`), not the room.

Train and held-out voices are disjoint: the acceptance speaks with synthesizer voices never used in training.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as audio_functional

from training.speech import SAMPLE_RATE_HZ, Utterance, _trim_silence, synthesize

_ESPEAK_VARIANTS_TRAIN = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt",
                          "klatt2", "klatt3", "croak", "Alex", "Andy", "Annie", "belinda", "benjamin", "david",
                          "edward", "grandma", "john", "linda", "max", "michel", "paul", "steph", "quincy")
_ESPEAK_ACCENTS_TRAIN = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc")
TRAIN_VOICES: tuple[str, ...] = tuple(
    f"espeak:{accent}+{variant}" for accent in _ESPEAK_ACCENTS_TRAIN for variant in _ESPEAK_VARIANTS_TRAIN
) + ("flite:kal", "flite:kal16", "flite:awb", "flite:rms")
# Never in training: another synthesizer's voice (Flite's SLT, a recorded female speaker's units) and
# espeak variants and accents not listed above.
HELDOUT_VOICES: tuple[str, ...] = ("flite:slt", "espeak:en-gb-x-gbclan+Denis", "espeak:en-gb-x-gbcwmd+aunty",
                                   "espeak:en-us+Mario", "espeak:en-gb-x-gbclan+Storm")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; install it with `apt-get install {name}`")
    return path


def speak(text: str, voice: str, words_per_min: int = 165, pitch: int = 50,
          sample_rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """`text` in `voice` (`espeak:...` or `flite:...`), float32 mono at `sample_rate_hz`, silence trimmed."""
    engine, _, name = voice.partition(":")
    if engine == "espeak":
        return synthesize(text, name, words_per_min, pitch, sample_rate_hz)
    if engine != "flite":
        raise ValueError(f"unknown voice {voice!r}: use espeak:<voice> or flite:<voice>")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        stretch = 165.0 / max(words_per_min, 60)  # flite's duration factor: > 1 is slower
        result = subprocess.run([require_tool("flite"), "-voice", name, "--setf", f"duration_stretch={stretch:.3f}",
                                 "-t", text, "-o", str(out)], capture_output=True, check=False)
        if result.returncode != 0 or not out.exists():
            raise RuntimeError(f"flite failed for voice {name!r}: {result.stderr.decode(errors='replace')}")
        speech, rate_hz = read_wav(out)
    if rate_hz != sample_rate_hz:
        speech = audio_functional.resample(torch.from_numpy(speech), rate_hz, sample_rate_hz).numpy()
    return _trim_silence(speech, sample_rate_hz)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as wav:
        rate_hz = wav.getframerate()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
        if wav.getnchannels() > 1:
            pcm = pcm.reshape(-1, wav.getnchannels()).mean(axis=1)
    return pcm.astype(np.float32) / 32768.0, rate_hz


def sox(samples: np.ndarray, sample_rate_hz: int, effects: list[str]) -> np.ndarray:
    """Run `samples` through sox `effects` (float32 in and out, same rate)."""
    if not effects:
        return samples
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    fmt = ["-t", "raw", "-r", str(sample_rate_hz), "-e", "signed", "-b", "16", "-c", "1"]
    result = subprocess.run([require_tool("sox"), *fmt, "-", *fmt, "-", *effects, "rate", str(sample_rate_hz)],
                            input=pcm, capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"sox {' '.join(effects)} failed: {result.stderr.decode(errors='replace')}")
    return np.frombuffer(result.stdout, dtype="<i2").astype(np.float32) / 32768.0


def voice_change(rng: np.random.Generator) -> list[str]:
    """sox effects that make another speaker of a voice: pitch, tempo and (some of the time) formants."""
    effects = []
    if rng.random() < 0.35:  # formants: resample-speed, then put the pitch back part of the way
        factor = float(rng.uniform(0.88, 1.14))
        effects += ["speed", f"{factor:.3f}", "pitch", f"{-1200 * np.log2(factor) * rng.uniform(0.3, 1.0):.0f}"]
    if rng.random() < 0.6:
        effects += ["pitch", f"{rng.uniform(-350, 350):.0f}"]
    if rng.random() < 0.5:
        effects += ["tempo", "-s", f"{rng.uniform(0.85, 1.2):.3f}"]
    return effects


def room_noise(rng: np.random.Generator, num_samples: int, sample_rate_hz: int) -> np.ndarray:
    """Coloured room noise (white to brown) with, sometimes, mains hum; unit RMS."""
    white = rng.standard_normal(num_samples).astype(np.float32)
    tilt = float(rng.uniform(0.0, 2.0))  # spectral slope: 0 white, 1 pink, 2 brown
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(num_samples, 1.0 / sample_rate_hz)
    spectrum *= 1.0 / np.maximum(freqs, 20.0) ** (tilt / 2)
    noise = np.fft.irfft(spectrum, n=num_samples).astype(np.float32)
    if rng.random() < 0.3:
        t = np.arange(num_samples) / sample_rate_hz
        noise += np.std(noise) * rng.uniform(0.3, 1.5) * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * t)
    return noise / max(float(np.std(noise)), 1e-9)


def opus_round_trip(samples: np.ndarray, sample_rate_hz: int, bitrate_bps: int) -> np.ndarray:
    """Encode with libopus at 48 kHz (as WebRTC sends it) and decode back to `sample_rate_hz`, aligned."""
    import av  # only where speech is made: the GPU machines that train on the saved speech have no av

    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48000, "mono", "s16"
    encoder.bit_rate = bitrate_bps
    decoder = av.CodecContext.create("opus", "r")
    decoder.sample_rate, decoder.layout = 48000, "mono"
    up = av.AudioResampler(format="s16", layout="mono", rate=48000)
    down = av.AudioResampler(format="flt", layout="mono", rate=sample_rate_hz)
    frame = av.AudioFrame.from_ndarray((np.clip(samples, -1, 1) * 32767).astype(np.int16)[None], format="s16",
                                       layout="mono")
    frame.sample_rate = sample_rate_hz
    pcm48 = np.concatenate([f.to_ndarray()[0] for f in up.resample(frame) + up.resample(None)])
    pcm48 = np.concatenate([pcm48, np.zeros(960 * 4, np.int16)])  # flush the encoder's look-ahead
    out = []
    for start in range(0, len(pcm48) - 959, 960):  # 20 ms packets
        chunk = av.AudioFrame.from_ndarray(pcm48[start:start + 960][None], format="s16", layout="mono")
        chunk.sample_rate, chunk.pts = 48000, start
        for packet in encoder.encode(chunk):
            for decoded in decoder.decode(packet):
                decoded.pts = None
                out += [f.to_ndarray()[0] for f in down.resample(decoded)]
    decoded = np.concatenate(out) if out else np.zeros(0, np.float32)
    delay = round(encoder.delay * sample_rate_hz / 48000) if getattr(encoder, "delay", 0) else 0
    delay = delay or _best_delay(samples, decoded, max_shift=sample_rate_hz // 50)
    result = np.zeros(len(samples), np.float32)
    kept = decoded[delay: delay + len(samples)]
    result[: len(kept)] = kept
    return result


def _best_delay(a: np.ndarray, b: np.ndarray, max_shift: int) -> int:
    n = min(len(a), len(b) - max_shift)
    if n <= 0:
        return 0
    scores = [float(np.dot(a[:n], b[s:s + n])) for s in range(max_shift)]
    return int(np.argmax(scores))


def make_varied_utterance(seed: int, sentences: tuple[str, ...], voices: tuple[str, ...],
                          num_sentences: tuple[int, int] = (1, 3), sample_rate_hz: int = SAMPLE_RATE_HZ,
                          opus_share: float = 0.6) -> Utterance:
    """1-3 sentences in a voice of `voices`, changed by sox, in a room, maybe through Opus; fixed by `seed`."""
    rng = np.random.default_rng([seed, 4242])
    voice = str(rng.choice(voices))
    count = int(rng.integers(num_sentences[0], num_sentences[1] + 1))
    chosen = [str(s) for s in rng.choice(sentences, size=count, replace=False)]
    words_per_min, pitch = int(rng.integers(130, 200)), int(rng.integers(25, 80))
    change = voice_change(rng)
    pieces = [np.zeros(int(rng.uniform(0.3, 1.0) * sample_rate_hz), np.float32)]
    for sentence in chosen:
        dry = speak(sentence, voice, words_per_min, pitch, sample_rate_hz)
        pieces.append(sox(dry, sample_rate_hz, change))
        pieces.append(np.zeros(int(rng.uniform(0.4, 1.2) * sample_rate_hz), np.float32))
    clean = np.concatenate(pieces)
    clean *= 10 ** (rng.uniform(-8.0, 0.0) / 20) * 0.5 / max(float(np.abs(clean).max()), 1e-6)
    heard = clean
    if rng.random() < 0.5:
        heard = sox(clean, sample_rate_hz, ["reverb", f"{rng.uniform(10, 70):.0f}", "50",
                                            f"{rng.uniform(30, 100):.0f}"])[: len(clean)]
        heard *= np.abs(clean).max() / max(float(np.abs(heard).max()), 1e-6)
    snr_db = rng.uniform(12.0, 45.0)
    speech_rms = float(np.sqrt(np.mean(clean[np.abs(clean) > 0.01] ** 2))) if (np.abs(clean) > 0.01).any() else 0.05
    heard = heard + room_noise(rng, len(clean), sample_rate_hz) * speech_rms * 10 ** (-snr_db / 20)
    if rng.random() < opus_share:
        heard = opus_round_trip(heard, sample_rate_hz, int(rng.choice([16000, 24000, 32000, 48000])))
    name = voice + ("" if not change else " (" + " ".join(change) + ")")
    return Utterance(samples=np.clip(heard, -1, 1).astype(np.float32), clean=clean.astype(np.float32),
                     sample_rate_hz=sample_rate_hz, text=" ".join(chosen), voice=name)
