"""Prometheus metrics of one server: sessions, clips, generation time, queue depth, drops, errors by kind.

Each app has its own registry (not the process-global one), so several servers in one process
(tests, benchmarks) never share or clash over series.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

GENERATION_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Counters the server and engine bump as things happen, plus gauges read when scraped."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_started = Counter("liveavatar_sessions_started", "Sessions admitted since start",
                                        registry=r)
        self.clips_generated = Counter("liveavatar_clips_generated", "Video clips the model finished",
                                       registry=r)
        self.generation_seconds = Histogram("liveavatar_generation_seconds", "Model time per clip (seconds)",
                                            buckets=GENERATION_BUCKETS_S, registry=r)
        self.frames_dropped = Counter("liveavatar_frames_dropped", "Video frames never made because a "
                                      "session's queue overflowed (generation slower than real time)",
                                      registry=r)
        self.errors = Counter("liveavatar_errors", "Errors sent to clients or met by the engine, by kind",
                              ["kind"], registry=r)
        self.worker_restarts = Counter("liveavatar_worker_restarts", "Model worker restarts after it died",
                                       registry=r)
        self._sessions = Gauge("liveavatar_sessions", "Live sessions", registry=r)
        self._queue_depth = Gauge("liveavatar_queue_depth", "Clip windows waiting or in work, all sessions",
                                  registry=r)
        self._worker_alive = Gauge("liveavatar_worker_alive", "1 if the model worker is running", registry=r)
        self._model_loaded = Gauge("liveavatar_model_loaded", "1 once the model weights are loaded", registry=r)

    def watch(self, sessions: Callable[[], float], queue_depth: Callable[[], float],
              worker_alive: Callable[[], float], model_loaded: Callable[[], float]) -> None:
        """Gauges read their value from the live server at scrape time."""
        self._sessions.set_function(sessions)
        self._queue_depth.set_function(queue_depth)
        self._worker_alive.set_function(worker_alive)
        self._model_loaded.set_function(model_loaded)

    def clip_generated(self, generation_s: float) -> None:
        """The engine finished a clip in `generation_s` seconds of model time."""
        self.clips_generated.inc()
        self.generation_seconds.observe(generation_s)

    def clip_dropped(self, frames: int) -> None:
        """A waiting window was dropped; its `frames` will never be made."""
        self.frames_dropped.inc(frames)

    def error(self, kind: str) -> None:
        """An error of this kind (the `code` sent to the client, or an engine event)."""
        self.errors.labels(kind=kind).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
