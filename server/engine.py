"""`ModelEngine`: the bridge between asyncio and the model, one model shared by a few sessions.

The weights are loaded once; every model call runs on one worker thread (the loop never blocks),
each session has its own queue of windows, sessions take turns clip by clip, and a session that
leaves has its queued work cancelled and its caches freed. If the worker dies, every live session
is told (`SessionLost`) and a fresh worker takes over for new sessions.

A caller that passes `on_part` gets each clip block by block (`StreamingAvatar.clip_parts`): the
worker hands every part to the loop as soon as it is decoded, so the first frames can play after one
block of compute instead of the whole clip. Avatars without `clip_parts` give one whole-clip part.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.config import AppConfig
from model.io_types import AudioWindow, VideoClip
from server.seam import ClipDropped, EngineBusy, GeneratorStats, SessionClosed, SessionLost, StreamFormat
from server.worker import ModelWorker, WorkerDied

log = logging.getLogger(__name__)

SAMPLE_STEPS_RANGE = (1, 8)  # the same bounds `model.config` enforces on sampler.sample_steps


def check_sample_steps(value: Any) -> int:
    """Return `value` as a step count, or raise a ValueError saying what is allowed."""
    lo, hi = SAMPLE_STEPS_RANGE
    # bool is an int, and inf/nan (JSON's Infinity/NaN) cannot become one: refuse them before int()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value or not lo <= int(value) <= hi:
        raise ValueError(f"sample_steps must be an integer in {lo}..{hi}, got {value!r}")
    return int(value)


PartSink = Callable[[VideoClip], None]


@dataclass
class _Job:
    window: AudioWindow
    future: asyncio.Future
    on_part: PartSink | None = None  # called on the loop with each part, in order, while the job runs
    first_part_s: float | None = None  # when its first part reached the loop (monotonic seconds)


@dataclass
class _Slot:
    """One session's state inside the engine."""

    sample_steps: int
    avatar: Any = None  # model.stream.avatar.StreamingAvatar once started
    queue: deque[_Job] = field(default_factory=deque)
    running: bool = False
    closed: bool = False
    lost: str | None = None  # why its avatar state is gone (the worker died)
    clips_done: int = 0
    clips_dropped: int = 0
    last_clip_index: int | None = None
    last_clip_sample_steps: int | None = None
    last_generation_s: float | None = None
    last_first_part_s: float | None = None


class ModelEngine:
    """Implements the `ClipGenerator` seam on `model.stream.avatar.StreamingAvatar` (see server/seam.py)."""

    def __init__(self, cfg: AppConfig, models: Any = None) -> None:
        self._cfg = cfg
        self._models = models
        self._owns_models = models is None  # weights we loaded we also reload after a worker dies
        self._worker = ModelWorker()
        self._slots: dict[str, _Slot] = {}
        self._turns: deque[str] = deque()  # round-robin order of sessions
        self._wakeup = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._format: StreamFormat | None = None
        self.max_sessions = cfg.server.max_sessions
        self.max_pending_clips = cfg.server.max_pending_clips
        self.worker_restarts = 0
        self.metrics: Any = None  # server.metrics.ServerMetrics once the app binds it
        self._loss_listeners: list[Callable[[str, str], None]] = []
        self._recovering: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None

    # ------------------------------------------------------------------ life of the engine

    async def load(self) -> None:
        """Load the weights (once) and start taking work; call before the first session."""
        if self._scheduler is not None:
            return
        self._format = await self._worker.call(self._load_in_worker)
        self._scheduler = asyncio.create_task(self._schedule(), name="model-engine-scheduler")
        self._watchdog = asyncio.create_task(self._watch_worker(), name="model-engine-watchdog")

    def _load_in_worker(self) -> StreamFormat:
        from model.stream.avatar import AvatarModels, StreamingAvatar

        if self._models is None or (self._owns_models and self.worker_restarts > 0):
            t0 = time.monotonic()
            self._models = AvatarModels.load(self._cfg)
            log.info("model loaded in %.1f s", time.monotonic() - t0)
            if self._cfg.runtime.warmup_clips:
                self._warm_up(self._cfg.runtime.warmup_clips)
        probe = StreamingAvatar(self._models, self._cfg, seed=self._cfg.runtime.seed)
        try:
            video = self._cfg.video
            return StreamFormat(fps=float(probe.fps), frames_per_clip=probe.frames_per_clip,
                                frame_size=tuple(probe.frame_size), sample_rate_hz=probe.sample_rate_hz,
                                clip_samples=probe.clip_samples, context_samples=probe.context_samples,
                                lookahead_samples=round(self._cfg.model.audio_encoder.lookahead_s * probe.sample_rate_hz),
                                sizing_area_hw=(video.height, video.width) if video.sizing == "aspect" else None)
        finally:
            probe.close()

    def _warm_up(self, clips: int) -> None:
        """Run a throwaway session of `clips` silent clips before the first viewer comes.

        The first clips of a process pay for kernel selection, allocator growth and, with
        `runtime.compile`, one compilation per attended length (about 20-30 s per shape for the 14B
        block); a live audience should not wait for that. Every shape a stream meets is met by its
        first clip (the KV window fills block by block) plus one steady clip. Sessions start fresh
        afterwards, so their frames are the same as without the warm-up.
        """
        from model.io_types import AudioWindow
        from model.parallel.followers import new_avatar

        t0 = time.monotonic()
        avatar = new_avatar(self._models, self._cfg, seed=self._cfg.runtime.seed)
        try:
            height, width = avatar.frame_size
            avatar.start(np.full((height, width, 3), 128, np.uint8), self._cfg.server.prompt)
            samples = np.zeros(avatar.context_samples + avatar.clip_samples, np.float32)
            for k in range(clips):
                window = AudioWindow(samples, avatar.context_samples, k * avatar.clip_samples / avatar.sample_rate_hz, k)
                if streams_parts(avatar):
                    for _ in avatar.clip_parts(window):
                        pass
                else:
                    avatar.next_clip(window)
        finally:
            avatar.close()
        log.info("warm-up: %d silent clips in %.1f s", clips, time.monotonic() - t0)

    async def close(self) -> None:
        """Stop every session, then the worker thread."""
        for session_id in list(self._slots):
            await self.stop(session_id)
        for task in (self._watchdog, self._recovering, self._scheduler):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._scheduler = self._watchdog = self._recovering = None
        await asyncio.get_running_loop().run_in_executor(None, self._worker.stop)

    @property
    def stream_format(self) -> StreamFormat:
        if self._format is None:
            raise RuntimeError("ModelEngine.load() must finish before sessions start")
        return self._format

    @property
    def active_sessions(self) -> int:
        return len(self._slots)

    @property
    def model_loaded(self) -> bool:
        return self._format is not None and self._models is not None

    @property
    def worker_alive(self) -> bool:
        return self._worker.alive and self._recovering is None

    @property
    def queue_depth(self) -> int:
        """Windows waiting or in work, over all sessions."""
        return sum(sum(1 for job in slot.queue if not job.future.done()) + int(slot.running)
                   for slot in self._slots.values())

    def add_loss_listener(self, listener: Callable[[str, str], None]) -> None:
        """`listener(session_id, reason)` is called for every live session when the worker dies."""
        self._loss_listeners.append(listener)

    def kill_worker(self) -> None:
        """End the model worker as a crash would; the engine notices, tells live sessions and restarts it."""
        self._worker.kill()

    # ------------------------------------------------------------------ the ClipGenerator seam

    async def start(self, session_id: str, reference_image: np.ndarray, prompt: str,
                    sample_steps: int | None = None) -> None:
        """Admit a session (or raise EngineBusy) and prepare its avatar from the reference image."""
        if session_id in self._slots:
            raise ValueError(f"session {session_id!r} is already started")
        if self._recovering is not None:  # a new worker is starting; new sessions wait for it
            await asyncio.shield(self._recovering)
        if len(self._slots) >= self.max_sessions:
            raise EngineBusy(f"server busy: all {self.max_sessions} session slots are in use; "
                             "try again when someone leaves (or start the server with a larger "
                             "--max_sessions)")
        steps = check_sample_steps(self._cfg.sampler.sample_steps if sample_steps is None else sample_steps)
        slot = _Slot(sample_steps=steps)
        self._slots[session_id] = slot  # reserved before the first await, so admission cannot race
        self._turns.append(session_id)
        try:
            avatar = await self._worker.call(self._new_avatar, reference_image, prompt)
        except WorkerDied as exc:
            self._forget(session_id)
            self._worker_died(str(exc))
            raise SessionLost(f"{exc}; the server is restarting it, start again in a moment") from None
        except BaseException:
            self._forget(session_id)
            raise
        if slot.closed or slot.lost:  # stopped (or the worker died) while the avatar was being prepared
            await self._close_avatar(avatar)
            if slot.lost:
                raise SessionLost(slot.lost)
            raise SessionClosed(f"session {session_id!r} was stopped while starting")
        slot.avatar = avatar

    def _new_avatar(self, reference_image: np.ndarray, prompt: str) -> Any:
        from model.parallel.followers import new_avatar

        # a StreamingAvatar, or under torchrun one that the other GPUs' processes follow call by call
        avatar = new_avatar(self._models, self._cfg, seed=self._cfg.runtime.seed)
        avatar.start(reference_image, prompt)
        return avatar

    async def submit(self, session_id: str, window: AudioWindow, on_part: PartSink | None = None) -> VideoClip:
        """Queue a window; resolve to its clip (ClipDropped if newer audio pushed it out of the queue).

        With `on_part`, each part of the clip (`VideoClip.offset`/`final`) is passed to it on the loop
        as soon as the model has it, in order, and `submit` resolves to the final part once the clip is
        done. An error from `on_part` fails this clip (submit raises it); parts of a clip whose caller
        went away are dropped.
        """
        slot = self._live_slot(session_id)
        if slot.lost:
            raise SessionLost(slot.lost)
        job = _Job(window, asyncio.get_running_loop().create_future(), on_part)
        slot.queue.append(job)
        while len(slot.queue) > self.max_pending_clips:
            stale = slot.queue.popleft()
            if not stale.future.done():
                slot.clips_dropped += 1
                if self.metrics is not None:
                    self.metrics.clip_dropped(self._format.frames_per_clip if self._format else 0)
                stale.future.set_exception(ClipDropped(
                    f"clip {stale.window.clip_index} dropped: generation is slower than real time, "
                    f"{self.max_pending_clips} newer windows were waiting"))
        self._wakeup.set()
        return await job.future

    def set_sample_steps(self, session_id: str, sample_steps: int) -> None:
        """Denoising steps for this session's next clip to start (fewer = faster, rougher)."""
        self._live_slot(session_id).sample_steps = check_sample_steps(sample_steps)

    def stats(self, session_id: str) -> GeneratorStats:
        slot = self._live_slot(session_id)
        waiting = sum(1 for job in slot.queue if not job.future.done())
        return GeneratorStats(queue_depth=waiting + int(slot.running), sample_steps=slot.sample_steps,
                              clips_done=slot.clips_done, clips_dropped=slot.clips_dropped,
                              last_clip_index=slot.last_clip_index,
                              last_clip_sample_steps=slot.last_clip_sample_steps,
                              last_generation_s=slot.last_generation_s,
                              last_first_part_s=slot.last_first_part_s)

    async def stop(self, session_id: str) -> None:
        """Cancel the session's queued work and free its caches (after a clip already in work)."""
        slot = self._slots.get(session_id)
        if slot is None:
            return
        slot.closed = True
        self._forget(session_id)
        for job in slot.queue:
            job.future.cancel()
        slot.queue.clear()
        if slot.avatar is not None:
            avatar, slot.avatar = slot.avatar, None
            # the single worker runs this after any clip of this session already in work
            await self._close_avatar(avatar)

    async def _close_avatar(self, avatar: Any) -> None:
        try:
            await self._worker.call(avatar.close)
        except WorkerDied:
            pass  # the dead worker's caches go with it

    # ------------------------------------------------------------------ worker failure

    def _worker_died(self, reason: str) -> None:
        """Tell every live session its avatar is gone, then start a fresh worker (once per death)."""
        if self._recovering is not None:
            return
        log.error("%s; telling %d live session(s) and restarting it", reason, len(self._slots))
        if self.metrics is not None:
            self.metrics.error("worker_died")
        message = f"{reason}; this session's avatar was lost, start again"
        for session_id, slot in list(self._slots.items()):
            slot.lost = message
            slot.avatar = None  # its caches lived on the dead worker
            for job in slot.queue:
                if not job.future.done():
                    job.future.set_exception(SessionLost(message))
            slot.queue.clear()
            for listener in list(self._loss_listeners):
                try:
                    listener(session_id, message)
                except Exception:
                    log.exception("session-loss listener failed")
        self._recovering = asyncio.get_running_loop().create_task(self._restart_worker(),
                                                                  name="model-engine-restart")

    async def _restart_worker(self) -> None:
        old = self._worker
        self.worker_restarts += 1
        if self.metrics is not None:
            self.metrics.worker_restarts.inc()
        self._worker = ModelWorker()
        try:
            await asyncio.get_running_loop().run_in_executor(None, old.join, 5.0)
            self._format = await self._worker.call(self._load_in_worker)
            log.info("model worker restarted (%d restart(s) so far)", self.worker_restarts)
        finally:
            self._recovering = None
            self._wakeup.set()

    async def _watch_worker(self, interval_s: float = 0.25) -> None:
        """Notice a worker that died between calls, so idle sessions hear of it too."""
        while True:
            await asyncio.sleep(interval_s)
            if self._recovering is None and not self._worker.alive:
                self._worker_died(self._worker.dead_reason or "the model worker stopped")

    # ------------------------------------------------------------------ internals

    def _live_slot(self, session_id: str) -> _Slot:
        slot = self._slots.get(session_id)
        if slot is None or slot.closed:
            raise SessionClosed(f"session {session_id!r} is not running (stopped or never started)")
        return slot

    def _forget(self, session_id: str) -> None:
        self._slots.pop(session_id, None)
        try:
            self._turns.remove(session_id)
        except ValueError:
            pass

    def _next_job(self) -> tuple[_Slot, _Job] | None:
        """The next window to run, taking sessions in turn so one busy session cannot starve others."""
        for _ in range(len(self._turns)):
            session_id = self._turns[0]
            self._turns.rotate(-1)
            slot = self._slots[session_id]
            while slot.queue and slot.queue[0].future.done():
                slot.queue.popleft()  # cancelled by its caller
            if slot.queue and slot.avatar is not None and not slot.lost:
                return slot, slot.queue.popleft()
        return None

    async def _schedule(self) -> None:
        while True:
            picked = None if self._recovering is not None else self._next_job()
            if picked is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            slot, job = picked
            steps = slot.sample_steps
            slot.running = True
            started_s = time.monotonic()
            sink = None if job.on_part is None else _ThreadSafeSink(asyncio.get_running_loop(), job)
            try:
                clip = await self._worker.call(_run_clip, slot.avatar, job.window, steps, sink)
            except WorkerDied as exc:
                slot.running = False
                self._worker_died(str(exc))
                if not job.future.done():  # the clip in work was already off the queue
                    job.future.set_exception(SessionLost(slot.lost or str(exc)))
                continue
            except Exception as exc:  # a model failure ends this clip, not the engine
                log.exception("clip %d failed", job.window.clip_index)
                if self.metrics is not None:
                    self.metrics.error("clip_failed")
                if not job.future.done():
                    job.future.set_exception(exc)
                continue
            finally:
                slot.running = False
            slot.clips_done += 1
            slot.last_clip_index = clip.clip_index
            slot.last_clip_sample_steps = steps
            slot.last_generation_s = time.monotonic() - started_s
            slot.last_first_part_s = None if job.first_part_s is None else job.first_part_s - started_s
            if self.metrics is not None:
                self.metrics.clip_generated(slot.last_generation_s)
            if not job.future.done():
                job.future.set_result(clip)


class _ThreadSafeSink:
    """Carries a job's parts from the worker thread to its `on_part` on the loop, in order.

    Each part is scheduled with `call_soon_threadsafe`, which the worker also uses to settle the job's
    future after its call returns, so every part reaches the loop before the job is done.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, job: _Job) -> None:
        self._loop = loop
        self._job = job

    def __call__(self, part: VideoClip) -> None:  # on the worker thread
        try:
            self._loop.call_soon_threadsafe(self._deliver, part)
        except RuntimeError:
            pass  # the loop is closed; nobody is waiting any more

    def _deliver(self, part: VideoClip) -> None:  # on the loop
        job = self._job
        if job.future.done() or job.on_part is None:
            return  # cancelled (session stopped) or failed on an earlier part
        if job.first_part_s is None:
            job.first_part_s = time.monotonic()
        try:
            job.on_part(part)
        except Exception as exc:  # noqa: BLE001 - the consumer refused the part: this clip fails, not the engine
            job.future.set_exception(exc)


def streams_parts(avatar: Any) -> bool:
    """True if the avatar's class offers `clip_parts`.

    Looked up on the class, not the instance: a wrapper that forwards unknown attributes to an inner
    avatar (model.parallel.followers.GroupAvatar) would otherwise hand out the inner avatar's `clip_parts`,
    which skips the wrapper's own `next_clip` (there: announcing the clip to the other GPUs' processes).
    """
    return callable(getattr(type(avatar), "clip_parts", None))


def _run_clip(avatar: Any, window: AudioWindow, sample_steps: int, on_part: PartSink | None) -> VideoClip:
    """Runs on the worker thread (the model sets its own inference mode there); returns the final part.

    With a sink, the clip goes out part by part as each block is decoded (the whole clip as one part
    for avatars without `clip_parts`); `clip_parts` is always run to its end, since the avatar carries
    its motion state into the next clip after the last block.
    """
    if on_part is None or not streams_parts(avatar):
        clip = avatar.next_clip(window, sample_steps=sample_steps)
        if on_part is not None:
            on_part(clip)
        return clip
    last: VideoClip | None = None
    for part in avatar.clip_parts(window, sample_steps=sample_steps):
        on_part(part)
        last = part
    if last is None or not last.final:
        raise RuntimeError(f"clip {window.clip_index}: the avatar's clip_parts ended before the final part")
    return last
