"""Text to speech for `speak {"text": ...}`: espeak-ng, local, no downloads, in a subprocess off the loop.

The better-sounding local engines on the package registries (Piper, Kokoro, Coqui) all fetch their voice
weights on first use, which this server must never do, so espeak-ng (a Debian package, `make setup`) is the
engine. Its voices are listed by `espeak-ng --voices`; `--server.tts_voice` picks the default.
"""
from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from server.speech_input import SpeechError, decode_speech

VOICE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+\-]{0,39}$")  # e.g. en, en-us, de, en+f3
TIMEOUT_S = 60.0


def check_voice(voice: object) -> str:
    """A voice name espeak-ng may be given (never an option: no leading '-'), or SpeechError."""
    if not isinstance(voice, str) or not VOICE_PATTERN.match(voice):
        raise SpeechError("bad_voice", f"voice must be an espeak-ng voice name such as 'en', 'en-us' or 'de' "
                                       f"(espeak-ng --voices), got {voice!r}")
    return voice


async def synthesize(text: str, voice: str, max_s: float) -> np.ndarray:
    """Speak `text` with espeak-ng; 48 kHz mono int16. SpeechError for an unknown voice or too long a result."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SpeechError("tts_unavailable", "text speech needs espeak-ng on the server (make setup installs it); "
                                             "send an audio file instead")
    check_voice(voice)
    with tempfile.TemporaryDirectory(prefix="liveavatar-tts-") as folder:
        wav = Path(folder) / "speech.wav"
        process = await asyncio.create_subprocess_exec(
            espeak, "-v", voice, "-w", str(wav), "--stdin",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, stderr = await asyncio.wait_for(process.communicate(text.encode("utf-8")), TIMEOUT_S)
        except BaseException:  # timed out or cancelled (the client left): the subprocess must not outlive it
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            reason = stderr.decode("utf-8", "replace").strip() or f"exit status {process.returncode}"
            raise SpeechError("bad_voice" if "voice" in reason.lower() else "tts_failed",
                              f"espeak-ng could not speak this ({reason}); voices: espeak-ng --voices")
        return decode_speech(wav.read_bytes(), max_s)
