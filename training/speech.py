"""Speech for the synthetic talking faces: espeak-ng sentences, pauses and light noise at the model's rate.

espeak-ng is deterministic for a given text, voice, speed and pitch, so an utterance is fully fixed by
its seed; the clean speech is kept beside the noisy mix because the mouth follows the voice, not the hiss.
"""
from __future__ import annotations

import shutil
import subprocess
import wave
from dataclasses import dataclass
from io import BytesIO

import numpy as np
import torch
import torchaudio.functional as audio_functional

SAMPLE_RATE_HZ = 16000

# espeak-ng voices with variants (`+f3` etc. change pitch and timbre), shared by both splits.
VOICES: tuple[str, ...] = (
    "en-us", "en-us+f2", "en-us+f4", "en-gb+m3", "en-gb-x-rp+f3", "en-gb-scotland+m5",
    "en-029+f1", "en-us+m7", "en-gb+klatt", "en-us-nyc+f5",
)

TRAIN_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello there, it is good to see you again.",
    "Could you please open the window a little?",
    "We walked along the beach until the sun went down.",
    "My favourite colour has always been a deep ocean blue.",
    "Tomorrow morning we will drive up to the mountains.",
    "She sells sea shells by the sea shore.",
    "How much wood would a woodchuck chuck?",
    "The meeting starts at nine, so please be on time.",
    "I think the answer is hidden in the last chapter.",
    "Oh, wow, that was a really loud noise!",
    "Peter picked a peck of pickled peppers.",
    "Do you remember the name of that little cafe?",
    "Bright lights flashed across the empty street.",
    "Ah, I see what you mean now.",
    "Please remember to water the plants on Monday.",
    "We need eggs, milk, bread and a bag of apples.",
    "Every evening the old man fed the pigeons.",
    "Yes, no, maybe, I really cannot decide.",
    "The train to Boston leaves from platform seven.",
    "Open wide and say aah for the doctor.",
    "A big black bug bit a big black bear.",
    "Music filled the hall as the lights went down.",
    "Why are you laughing? Was it something I said?",
    "Our team won the game in the final minute.",
    "Look out, the road is icy near the bridge.",
    "Mmm, this soup tastes absolutely wonderful.",
    "Five hundred people waited outside the stadium.",
    "The library closes early on public holidays.",
    "Wait, wait, wait, let me finish my sentence.",
    "Oranges and lemons grow well in warm places.",
    "Thank you very much for your kind words.",
    "The children played happily in the garden.",
    "Ooh, look at the size of that enormous balloon!",
    "I would like a cup of tea with a little honey.",
    "Each moment of the day can bring something new.",
    "Turn left at the lights, then go straight on.",
    "Papa bought a bamboo boat by the bay.",
    "Everyone agreed that the plan was far too risky.",
    "Quiet please, the baby is finally asleep.",
    "Seven silly swans swam slowly southward.",
    "Do not forget your umbrella, it might rain.",
    "Robots are learning to talk and to listen.",
    "Eat your vegetables and you will grow up strong.",
    "Wow, oh my, I never expected that at all.",
    "The painter mixed yellow and blue to make green.",
    "A gentle wind moved through the tall grass.",
    "Count with me: one, two, three, four, five.",
)

HELDOUT_SENTENCES: tuple[str, ...] = (
    "Good afternoon, and welcome to the evening news.",
    "Maybe we should order pizza for dinner tonight.",
    "The aeroplane landed safely despite the storm.",
    "Open the box and tell me what you find inside.",
    "Hurry up, or we will miss the beginning of the film.",
    "Bob and Amy baked a pie for their mother.",
    "What a beautiful morning to go for a long walk.",
    "I am absolutely sure I left my keys on the table.",
    "Wow, you really outdid yourself this time.",
    "Six small owls sat on the old oak branch.",
)


@dataclass(frozen=True)
class Utterance:
    """One synthetic recording: the noisy mix the model hears and the clean speech the mouth follows."""

    samples: np.ndarray  # float32 [N] at sample_rate_hz, speech + noise
    clean: np.ndarray  # float32 [N], speech only
    sample_rate_hz: int
    text: str
    voice: str

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate_hz


def require_espeak() -> str:
    """Path of espeak-ng, or an error that says how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("espeak-ng is not installed; install it with `apt-get install espeak-ng` "
                           "(or run `make setup`, which does)")
    return path


def synthesize(text: str, voice: str, words_per_min: int = 165, pitch: int = 50,
               sample_rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """Speak `text` with espeak-ng; float32 mono at `sample_rate_hz`, leading/trailing silence trimmed."""
    command = [require_espeak(), "--stdout", "-v", voice, "-s", str(words_per_min), "-p", str(pitch), text]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0 or len(result.stdout) < 64:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {result.stderr.decode(errors='replace')}")
    with wave.open(BytesIO(result.stdout)) as wav:
        native_rate_hz = wav.getframerate()
        # espeak-ng streams to stdout before it knows the length, so the header's frame count is bogus.
        pcm = np.frombuffer(wav.readframes(1 << 30), dtype=np.int16)
    speech = pcm.astype(np.float32) / 32768.0
    if native_rate_hz != sample_rate_hz:
        speech = audio_functional.resample(torch.from_numpy(speech), native_rate_hz, sample_rate_hz).numpy()
    return _trim_silence(speech, sample_rate_hz)


def _trim_silence(speech: np.ndarray, sample_rate_hz: int, floor_db: float = -50.0) -> np.ndarray:
    hop = sample_rate_hz // 100
    frames = speech[: len(speech) // hop * hop].reshape(-1, hop)
    level_db = 20 * np.log10(np.sqrt((frames**2).mean(axis=1)) + 1e-9)
    voiced = np.flatnonzero(level_db > floor_db)
    if len(voiced) == 0:
        return speech[:0]
    return speech[voiced[0] * hop: (voiced[-1] + 1) * hop]


def make_utterance(seed: int, sentences: tuple[str, ...] = TRAIN_SENTENCES, voices: tuple[str, ...] = VOICES,
                   num_sentences: tuple[int, int] = (1, 3), sample_rate_hz: int = SAMPLE_RATE_HZ) -> Utterance:
    """A recording of 1-3 sentences separated by pauses, with silence around it and light noise; fixed by `seed`."""
    rng = np.random.default_rng(seed)
    voice = str(rng.choice(voices))
    count = int(rng.integers(num_sentences[0], num_sentences[1] + 1))
    chosen = [str(s) for s in rng.choice(sentences, size=count, replace=False)]
    words_per_min = int(rng.integers(140, 190))
    pitch = int(rng.integers(30, 75))
    pieces = [np.zeros(int(rng.uniform(0.3, 1.0) * sample_rate_hz), np.float32)]
    for sentence in chosen:
        pieces.append(synthesize(sentence, voice, words_per_min, pitch, sample_rate_hz))
        pieces.append(np.zeros(int(rng.uniform(0.4, 1.2) * sample_rate_hz), np.float32))
    clean = np.concatenate(pieces)
    clean *= 10 ** (rng.uniform(-6.0, 0.0) / 20) * 0.5 / max(float(np.abs(clean).max()), 1e-6)
    noise_db = rng.uniform(-62.0, -48.0)
    noise = rng.standard_normal(len(clean)).astype(np.float32) * 10 ** (noise_db / 20)
    return Utterance(samples=(clean + noise).astype(np.float32), clean=clean.astype(np.float32),
                     sample_rate_hz=sample_rate_hz, text=" ".join(chosen), voice=voice)


def silence(duration_s: float, seed: int = 0, sample_rate_hz: int = SAMPLE_RATE_HZ) -> Utterance:
    """Room tone only: what the model hears when nobody speaks (the mouth must stay closed)."""
    rng = np.random.default_rng(seed)
    clean = np.zeros(int(duration_s * sample_rate_hz), np.float32)
    noise = rng.standard_normal(len(clean)).astype(np.float32) * 10 ** (-55.0 / 20)
    return Utterance(samples=noise, clean=clean, sample_rate_hz=sample_rate_hz, text="", voice="")


def write_wav(path: str, samples: np.ndarray, sample_rate_hz: int = SAMPLE_RATE_HZ) -> None:
    """16-bit mono WAV, the format the offline CLI and browsers read."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate_hz)
        wav.writeframes(pcm.tobytes())


def save_speech_bank(path: str, utterances: list[Utterance], keep_heard: bool = False) -> None:
    """Store utterances compactly (clean int16 speech + noise level) so a machine without espeak-ng can train.

    `keep_heard` also stores what the model hears: needed when it is not the clean speech plus white noise (a
    room, a voice change, the Opus round trip). Both are then stored as 8-bit mu-law (the G.711 curve, about
    38 dB of signal to quantisation noise, below most rooms' noise) so the bank travels to a GPU machine.
    """
    noise_rms = [float(np.sqrt(np.mean((u.samples - u.clean) ** 2))) for u in utterances]
    if keep_heard:
        clean = [mu_law_encode(u.clean) for u in utterances]
        extra = {"heard": np.concatenate([mu_law_encode(u.samples) for u in utterances]), "mu_law": np.array(1)}
    else:
        clean = [np.round(np.clip(u.clean, -1, 1) * 32767).astype(np.int16) for u in utterances]
        extra = {}
    np.savez_compressed(
        path, clean=np.concatenate(clean), lengths=np.array([len(c) for c in clean], np.int64),
        noise_rms=np.array(noise_rms, np.float32), sample_rate_hz=np.array(utterances[0].sample_rate_hz),
        texts=np.array([u.text for u in utterances]), voices=np.array([u.voice for u in utterances]), **extra)


def load_speech_bank(path: str) -> list[Utterance]:
    """Inverse of `save_speech_bank`; white noise (banks without the heard speech) is redrawn from a fixed seed."""
    with np.load(path) as saved:
        bank = {name: saved[name] for name in saved.files}  # each access of an npz member decompresses it again
    offsets = np.concatenate([[0], np.cumsum(bank["lengths"])])
    rate_hz = int(bank["sample_rate_hz"])
    utterances = []
    decode = mu_law_decode if "mu_law" in bank else (lambda pcm: pcm.astype(np.float32) / 32767)
    for i in range(len(bank["lengths"])):
        clean = decode(bank["clean"][offsets[i]: offsets[i + 1]])
        if "heard" in bank:
            samples = decode(bank["heard"][offsets[i]: offsets[i + 1]])
        else:
            noise = np.random.default_rng([i, 31]).standard_normal(len(clean)).astype(np.float32)
            samples = clean + noise * float(bank["noise_rms"][i])
        utterances.append(Utterance(samples=samples, clean=clean, sample_rate_hz=rate_hz, text=str(bank["texts"][i]),
                                    voice=str(bank["voices"][i])))
    return utterances


_MU = 255.0


def mu_law_encode(samples: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 codes on the mu-law curve (mu = 255)."""
    x = np.clip(samples, -1.0, 1.0)
    y = np.sign(x) * np.log1p(_MU * np.abs(x)) / np.log1p(_MU)
    return np.round((y + 1.0) * 127.5).astype(np.uint8)


def mu_law_decode(codes: np.ndarray) -> np.ndarray:
    """Inverse of `mu_law_encode`: float32 in [-1, 1]."""
    y = codes.astype(np.float32) / 127.5 - 1.0
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(_MU)) / _MU).astype(np.float32)
