"""Live sessions run in step on every DiT rank: rank 0 announces each call, the followers repeat it.

With sequence parallelism every DiT rank must make the same model calls in the same order, on the
same inputs and the same noise, or the collectives inside attention pair up wrongly. Rank 0 (which
hosts the server) therefore announces each session call as a `SessionJob` before running it itself;
the other ranks sit in `follow()` and run each announced job on their own `StreamingAvatar`.
On one process the announcement is a no-op, so the engine uses this class the same way everywhere.
"""
from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from model.io_types import AudioWindow, VideoClip

JOB_START = "start"
JOB_CLIP = "clip"
JOB_CLOSE = "close"
JOB_QUIT = "quit"


@dataclass(frozen=True)
class SessionJob:
    """One session call, as rank 0 announces it to the group (pickled over the control group)."""

    kind: str
    session_id: str = ""
    reference_image: np.ndarray | None = None
    prompt: str = ""
    seed: int = 0
    window: AudioWindow | None = None
    sample_steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class GroupSessions:
    """Every session's `StreamingAvatar` on this rank; on rank 0 each call is announced to the group first."""

    def __init__(self, models: Any, cfg: Any, group: Any,
                 make_avatar: Callable[[Any, Any, int], Any] | None = None) -> None:
        self._models = models
        self._cfg = cfg
        self._group = group
        self._make_avatar = make_avatar or _default_avatar
        self._avatars: dict[str, Any] = {}

    @property
    def session_ids(self) -> tuple[str, ...]:
        return tuple(self._avatars)

    # ---- rank 0: announce, then run
    def start(self, session_id: str, reference_image: np.ndarray, prompt: str, seed: int | None = None) -> Any:
        """Open a session on every rank with one seed, so every rank draws the same noise."""
        if seed is None:
            seed = self._cfg.runtime.seed if self._cfg.runtime.seed >= 0 else secrets.randbelow(2**31)
        return self._run(SessionJob(JOB_START, session_id, reference_image=reference_image, prompt=prompt,
                                    seed=seed))

    def next_clip(self, session_id: str, window: AudioWindow, sample_steps: int | None = None) -> VideoClip:
        """The session's next clip; every DiT rank denoises its share of the tokens."""
        return self._run(SessionJob(JOB_CLIP, session_id, window=window, sample_steps=sample_steps))

    def close(self, session_id: str) -> None:
        """Free the session's caches on every rank."""
        self._run(SessionJob(JOB_CLOSE, session_id))

    def shutdown(self) -> None:
        """Release the followers from `follow()` (rank 0, once, at server exit)."""
        for session_id in list(self._avatars):
            self.close(session_id)
        self._group.broadcast_job(SessionJob(JOB_QUIT))

    def _run(self, job: SessionJob) -> Any:
        if self._group.rank != 0:
            raise RuntimeError(f"rank {self._group.rank} tried to start a session call; only rank 0 may, "
                               "the other ranks run follow()")
        self._group.broadcast_job(job)
        return self.apply(job)

    # ---- every rank
    def apply(self, job: SessionJob) -> Any:
        """Run one announced job on this rank's avatars."""
        if job.kind == JOB_START:
            if job.session_id in self._avatars:
                raise ValueError(f"session {job.session_id!r} is already open")
            avatar = self._make_avatar(self._models, self._cfg, job.seed)
            avatar.start(job.reference_image, job.prompt)
            self._avatars[job.session_id] = avatar
            return None
        if job.kind == JOB_CLIP:
            avatar = self._avatars.get(job.session_id)
            if avatar is None:
                raise KeyError(f"no open session {job.session_id!r}; call start() first")
            return avatar.next_clip(job.window, sample_steps=job.sample_steps)
        if job.kind == JOB_CLOSE:
            avatar = self._avatars.pop(job.session_id, None)
            if avatar is not None:
                avatar.close()
            return None
        raise ValueError(f"unknown session job {job.kind!r}")

    def follow(self) -> int:
        """Follower ranks: run rank 0's jobs until it says quit; returns how many clips were made."""
        clips = 0
        while True:
            job = self._group.broadcast_job(None)
            if job.kind == JOB_QUIT:
                for session_id in list(self._avatars):
                    self.apply(SessionJob(JOB_CLOSE, session_id))
                return clips
            try:
                self.apply(job)
            except Exception as exc:  # rank 0 ran the same job on the same inputs and reports it to the user
                print(f"rank {self._group.rank}: {job.kind} job for session {job.session_id!r} failed: {exc}",
                      file=sys.stderr, flush=True)
            clips += job.kind == JOB_CLIP


def _default_avatar(models: Any, cfg: Any, seed: int) -> Any:
    from model.pipeline import StreamingAvatar

    return StreamingAvatar(models, cfg, seed=seed)
