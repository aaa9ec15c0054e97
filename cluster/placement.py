"""Where a new session goes: the least-loaded ready replica with a free slot (pure; no Ray, no I/O).

A replica's load is the larger of what it last reported and what the front itself placed there and
still holds: its report lags by one status probe, the front's own count misses sessions it did not
relay (e.g. after a restart of the front), so the larger is the safer of the two.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica as the front sees it at placement time."""

    name: str
    ready: bool  # answered its last status probe in time, model loaded, worker alive
    sessions: int  # live sessions it reported
    max_sessions: int
    placed: int = 0  # sessions the front placed there that are live or being opened

    @property
    def used(self) -> int:
        return max(self.sessions, self.placed)

    @property
    def free(self) -> int:
        """Slots a new session may take; none on a replica that is not ready."""
        return max(0, self.max_sessions - self.used) if self.ready else 0


def _preference(load: ReplicaLoad) -> tuple[float, int, str]:
    # least loaded by fraction (replicas may differ in size), then by count, then by name (stable ties)
    return (load.used / max(1, load.max_sessions), load.used, load.name)


def placement_order(loads: Iterable[ReplicaLoad], exclude: Iterable[str] = ()) -> list[str]:
    """Replicas with a free slot, best first; a refused try moves on to the next one."""
    skipped = set(exclude)
    return [load.name for load in sorted(loads, key=_preference) if load.free > 0 and load.name not in skipped]


def pick_replica(loads: Iterable[ReplicaLoad], exclude: Iterable[str] = ()) -> str | None:
    """The least-loaded ready replica with a free slot, or None when every ready replica is full."""
    order = placement_order(loads, exclude)
    return order[0] if order else None


def pick_any_ready(loads: Iterable[ReplicaLoad]) -> str | None:
    """A ready replica for messages that open no session (stop, set, malformed ones), least loaded first."""
    ready = sorted((load for load in loads if load.ready), key=_preference)
    return ready[0].name if ready else None


@dataclass(frozen=True)
class Capacity:
    """The cluster's slots, for /healthz, /metrics and the `busy`/`queued` messages."""

    replicas: int
    ready: int
    slots: int  # over ready replicas
    used: int  # over ready replicas

    @property
    def free(self) -> int:
        return max(0, self.slots - self.used)


def capacity(loads: Sequence[ReplicaLoad]) -> Capacity:
    ready = [load for load in loads if load.ready]
    return Capacity(replicas=len(loads), ready=len(ready), slots=sum(load.max_sessions for load in ready),
                    used=sum(min(load.used, load.max_sessions) for load in ready))
