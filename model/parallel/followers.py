"""Live sessions run in step on every DiT rank: rank 0 announces each call, the followers repeat it.

With sequence parallelism every DiT rank must make the same model calls in the same order, on the
same inputs and the same noise, or the collectives inside attention pair up wrongly. Rank 0 (which
hosts the server) therefore announces each session call as a `SessionJob` before running it itself;
the other ranks sit in `follow()` and run each announced job on their own `StreamingAvatar`.
`new_avatar()` hands the engine a plain `StreamingAvatar` on one process and a `GroupAvatar` (same
methods) in a group, so the engine's code is the same in both. Under `parallel.mode tpp` (one GPU per
sampling step) rank 0 gets a `model.parallel.tpp.TppAvatar` and the other ranks run `model.parallel.tpp.follow`.
"""
from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.io_types import AudioWindow, VideoClip
from model.parallel import group as parallel

JOB_START = "start"
JOB_CLIP = "clip"
JOB_CLOSE = "close"
JOB_QUIT = "quit"

_session_numbers = itertools.count()


@dataclass(frozen=True)
class SessionJob:
    """One session call, as rank 0 announces it to the group (pickled over the CPU control group)."""

    kind: str
    session_id: int = -1
    reference_image: np.ndarray | None = None
    prompt: str = ""
    seed: int = 0
    window: AudioWindow | None = None
    sample_steps: int | None = None


class GroupAvatar:
    """A `StreamingAvatar` on rank 0 whose every call is first announced to the follower ranks."""

    def __init__(self, models: Any, cfg: Any, seed: int | None, group: parallel.ParallelGroup) -> None:
        from model.stream.avatar import StreamingAvatar

        if group.rank != 0:
            raise RuntimeError(f"rank {group.rank} tried to open a session; only rank 0 serves, the other "
                               "ranks run follow()")
        self._group = group
        self._seed = cfg.runtime.seed if seed is None else seed
        self._local = StreamingAvatar(models, cfg, seed=self._seed)
        self.session_id = next(_session_numbers)
        self._open = False

    def start(self, reference_image: np.ndarray, prompt: str) -> None:
        """Open the session on every rank with one seed, so every rank draws the same noise."""
        self._group.broadcast_job(SessionJob(JOB_START, self.session_id, reference_image=reference_image,
                                             prompt=prompt, seed=self._seed))
        self._open = True
        self._local.start(reference_image, prompt)

    def next_clip(self, window: AudioWindow, sample_steps: int | None = None) -> VideoClip:
        """The window's clip; every DiT rank denoises its share of the tokens, rank 0 decodes."""
        self._group.broadcast_job(SessionJob(JOB_CLIP, self.session_id, window=window, sample_steps=sample_steps))
        return self._local.next_clip(window, sample_steps)

    def clip_parts(self, window: AudioWindow, sample_steps: int | None = None) -> Iterator[VideoClip]:
        """The window's clip block by block (first frames after one block); announced like `next_clip`."""
        self._group.broadcast_job(SessionJob(JOB_CLIP, self.session_id, window=window, sample_steps=sample_steps))
        yield from self._local.clip_parts(window, sample_steps)

    def close(self) -> None:
        """Free the session's caches on every rank."""
        if self._open:
            self._group.broadcast_job(SessionJob(JOB_CLOSE, self.session_id))
            self._open = False
        self._local.close()

    def __getattr__(self, name: str) -> Any:  # fps, frames_per_clip, denoiser_calls, ... of the local avatar
        return getattr(self._local, name)


def new_avatar(models: Any, cfg: Any, seed: int | None = None) -> Any:
    """The avatar the engine should use: plain on one process, announced to the group otherwise."""
    group = parallel.current()
    if group.distributed and group.pp_size > 1:
        from model.parallel.tpp import TppAvatar

        return TppAvatar(models, cfg, seed, group)
    if group.distributed and group.sp_size > 1:
        return GroupAvatar(models, cfg, seed, group)
    from model.stream.avatar import StreamingAvatar

    return StreamingAvatar(models, cfg, seed=seed)


def follow(models: Any, cfg: Any, group: parallel.ParallelGroup | None = None) -> int:
    """Follower ranks: run rank 0's session jobs until it says quit; returns how many clips were denoised
    (under tpp: how many blocks this rank ran its step on).

    Followers only denoise (their share of the tokens); the frames come from rank 0's decoder.
    """
    from model.stream.avatar import StreamingAvatar

    group = group or parallel.current()
    if group.pp_size > 1:
        from model.parallel import tpp

        return tpp.follow(models, cfg, group)
    avatars: dict[int, StreamingAvatar] = {}
    clips = 0
    while True:
        job: SessionJob = group.broadcast_job(None)
        if job.kind == JOB_QUIT:
            for avatar in avatars.values():
                avatar.close()
            return clips
        try:
            if job.kind == JOB_START:
                avatar = avatars.pop(job.session_id, None) or StreamingAvatar(models, cfg, seed=job.seed)
                avatar.start(job.reference_image, job.prompt)
                avatars[job.session_id] = avatar
            elif job.kind == JOB_CLIP:
                avatars[job.session_id].denoise_clip(job.window, job.sample_steps)
                clips += 1
            elif job.kind == JOB_CLOSE:
                avatar = avatars.pop(job.session_id, None)
                if avatar is not None:
                    avatar.close()
        except Exception as exc:  # noqa: BLE001 -- rank 0 ran the same job and reports it to the user
            print(f"rank {group.rank}: {job.kind} job of session {job.session_id} failed: {exc}",
                  file=sys.stderr, flush=True)


def release_followers(group: parallel.ParallelGroup | None = None) -> None:
    """Rank 0, at exit: tell the follower ranks to leave `follow()`."""
    group = group or parallel.current()
    if group.distributed and group.rank == 0:
        group.broadcast_job(SessionJob(JOB_QUIT))
