"""Metrics aggregation: every replica's series under a `replica` label, and the front's own gauges."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics_merge import FrontMetrics, render_cluster_metrics, render_replica_metrics
from cluster.placement import Capacity
from server.metrics import ServerMetrics


def replica_metrics(sessions: int, clips_s: list[float], errors: list[str]) -> str:
    """The exposition of a real replica's registry (the single server's metrics)."""
    metrics = ServerMetrics()
    metrics.watch(sessions=lambda: sessions, queue_depth=lambda: 0, worker_alive=lambda: 1, model_loaded=lambda: 1)
    for seconds in clips_s:
        metrics.clip_generated(seconds)
    for kind in errors:
        metrics.error(kind)
    return metrics.render()[0].decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition, parsed back."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_each_replica_keeps_its_series_under_its_label():
    text = render_replica_metrics({"avatar_0": replica_metrics(1, [0.3, 0.4], ["busy"]),
                                   "avatar_1": replica_metrics(2, [0.2], [])}).decode()
    got = samples(text)
    assert got[("liveavatar_sessions", (("replica", "avatar_0"),))] == 1
    assert got[("liveavatar_sessions", (("replica", "avatar_1"),))] == 2
    assert got[("liveavatar_clips_generated_total", (("replica", "avatar_0"),))] == 2
    assert got[("liveavatar_clips_generated_total", (("replica", "avatar_1"),))] == 1
    assert got[("liveavatar_errors_total", (("kind", "busy"), ("replica", "avatar_0")))] == 1
    assert got[("liveavatar_generation_seconds_count", (("replica", "avatar_0"),))] == 2
    assert got[("liveavatar_generation_seconds_bucket", (("le", "0.3"), ("replica", "avatar_1")))] == 1
    # one family per name, not one per replica
    assert text.count("# TYPE liveavatar_sessions gauge") == 1


def test_an_unreachable_replica_has_no_series_and_shows_down():
    front = FrontMetrics(["avatar_0", "avatar_1"])
    front.update({"avatar_0": True, "avatar_1": False}, Capacity(replicas=2, ready=1, slots=2, used=1), waiting=3)
    front.error("busy")
    text = render_cluster_metrics(front, {"avatar_0": replica_metrics(1, [], []), "avatar_1": None}).decode()
    got = samples(text)
    assert got[("liveavatar_replica_up", (("replica", "avatar_0"),))] == 1
    assert got[("liveavatar_replica_up", (("replica", "avatar_1"),))] == 0
    assert ("liveavatar_sessions", (("replica", "avatar_1"),)) not in got
    assert got[("liveavatar_cluster_replicas", ())] == 2
    assert got[("liveavatar_cluster_replicas_ready", ())] == 1
    assert got[("liveavatar_cluster_session_slots", ())] == 2
    assert got[("liveavatar_cluster_waiting", ())] == 3
    assert got[("liveavatar_front_errors_total", (("kind", "busy"),))] == 1
    # placements and failures exist for every replica from the start, so rates work before the first event
    assert got[("liveavatar_front_sessions_placed_total", (("replica", "avatar_1"),))] == 0
    assert got[("liveavatar_front_replica_failures_total", (("replica", "avatar_1"),))] == 0
