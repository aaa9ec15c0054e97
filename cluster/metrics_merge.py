"""One Prometheus exposition for the whole cluster: every replica's series with a `replica` label, plus
the front's own view (replicas up, slots, the waiting line, refusals, placements).

Each replica keeps the single server's metrics (server/metrics.py); the front scrapes them on each
`/metrics` request and relabels them, so one scrape target covers every GPU group. Sums over replicas
are left to the query (`sum by (kind) (liveavatar_errors_total)`), as Prometheus intends.
"""
from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from cluster.placement import Capacity

REPLICA_LABEL = "replica"


class _Families:
    """A collector that yields already-built families (the relabelled replica series)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def relabel_replica_metrics(texts: Mapping[str, str | None]) -> list[Metric]:
    """Parse each replica's exposition and merge same-named families, adding `replica="<name>"`.

    A replica whose text is None (unreachable at scrape time) contributes no series: its counters
    restart from zero when Serve brings it back, which Prometheus' rate() already handles.
    """
    merged: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        if text is None:
            continue
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                target.add_sample(sample.name, {**sample.labels, REPLICA_LABEL: replica}, sample.value,
                                  sample.timestamp)
    return list(merged.values())


def render_replica_metrics(texts: Mapping[str, str | None]) -> bytes:
    """The relabelled replica series as exposition text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(relabel_replica_metrics(texts)))
    return generate_latest(registry)


class FrontMetrics:
    """What only the front knows: refusals before any replica saw the request, placements, replica losses."""

    def __init__(self, replica_names: list[str]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.errors = Counter("liveavatar_front_errors", "Errors the front sent to clients, by kind", ["kind"],
                              registry=r)
        self.placed = Counter("liveavatar_front_sessions_placed", "Sessions the front placed, by replica",
                              [REPLICA_LABEL], registry=r)
        self.replica_failures = Counter("liveavatar_front_replica_failures", "Replicas that stopped answering "
                                        "while serving or being offered a session", [REPLICA_LABEL], registry=r)
        self._up = Gauge("liveavatar_replica_up", "1 if the replica answered its last status probe and is ready",
                         [REPLICA_LABEL], registry=r)
        self._replicas = Gauge("liveavatar_cluster_replicas", "Avatar replicas deployed", registry=r)
        self._ready = Gauge("liveavatar_cluster_replicas_ready", "Avatar replicas ready for sessions", registry=r)
        self._slots = Gauge("liveavatar_cluster_session_slots", "Session slots over ready replicas", registry=r)
        self._used = Gauge("liveavatar_cluster_sessions", "Sessions on ready replicas", registry=r)
        self._waiting = Gauge("liveavatar_cluster_waiting", "Offers waiting in the front's line", registry=r)
        for name in replica_names:  # every replica has its series from the start, at zero
            self.placed.labels(**{REPLICA_LABEL: name})
            self.replica_failures.labels(**{REPLICA_LABEL: name})

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def update(self, up: Mapping[str, bool], cap: Capacity, waiting: int) -> None:
        """The gauges as of this scrape."""
        for name, is_up in up.items():
            self._up.labels(**{REPLICA_LABEL: name}).set(1.0 if is_up else 0.0)
        self._replicas.set(cap.replicas)
        self._ready.set(cap.ready)
        self._slots.set(cap.slots)
        self._used.set(cap.used)
        self._waiting.set(waiting)


def render_cluster_metrics(front: FrontMetrics, texts: Mapping[str, str | None]) -> bytes:
    """The front's families then the replicas' (no name is in both: the replicas' are the single server's)."""
    return generate_latest(front.registry) + render_replica_metrics(texts)

