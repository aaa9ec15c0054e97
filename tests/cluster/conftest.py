"""Cluster tests reuse the server tests' speech (espeak-ng, 48 kHz)."""
from __future__ import annotations

from tests.server.conftest import speech_pcm, speech_wav  # noqa: F401  (fixtures)
