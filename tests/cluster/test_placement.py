"""Placement policy: least-loaded ready replica with a free slot; never a replica that is not ready."""
from __future__ import annotations

from cluster.placement import ReplicaLoad, capacity, pick_any_ready, pick_replica, placement_order


def load(name: str, sessions: int = 0, placed: int = 0, ready: bool = True, max_sessions: int = 2) -> ReplicaLoad:
    return ReplicaLoad(name=name, ready=ready, sessions=sessions, max_sessions=max_sessions, placed=placed)


def test_the_least_loaded_replica_gets_the_session():
    assert pick_replica([load("a", sessions=1), load("b", sessions=0), load("c", sessions=2)]) == "b"


def test_ties_go_to_the_first_by_name_so_placement_is_repeatable():
    assert pick_replica([load("b"), load("a")]) == "a"


def test_load_counts_sessions_the_front_placed_before_the_replica_reports_them():
    # "a" reported 0 but the front has an offer in flight there: "b" is the emptier one
    assert pick_replica([load("a", sessions=0, placed=1), load("b", sessions=0)]) == "b"
    # the report wins when it is higher (sessions the front did not place, e.g. before the front restarted)
    assert pick_replica([load("a", sessions=2, placed=0), load("b", sessions=1, placed=1)]) == "b"


def test_a_replica_that_is_not_ready_never_gets_a_session():
    loads = [load("a", ready=False), load("b", sessions=1)]
    assert pick_replica(loads) == "b"
    assert pick_replica([load("a", ready=False)]) is None
    assert pick_any_ready([load("a", ready=False)]) is None


def test_full_replicas_are_skipped_and_all_full_means_none():
    assert pick_replica([load("a", sessions=2), load("b", sessions=1)]) == "b"
    assert pick_replica([load("a", sessions=2), load("b", placed=2)]) is None
    # a full but ready replica still takes messages that open no session
    assert pick_any_ready([load("a", sessions=2), load("b", ready=False)]) == "a"


def test_load_is_a_fraction_of_each_replicas_slots():
    # 2 of 8 used is less loaded than 1 of 2
    assert pick_replica([load("big", sessions=2, max_sessions=8), load("small", sessions=1, max_sessions=2)]) == "big"


def test_placement_order_skips_replicas_already_tried():
    loads = [load("a"), load("b", sessions=1), load("c", sessions=2)]
    assert placement_order(loads) == ["a", "b"]
    assert placement_order(loads, exclude=["a"]) == ["b"]
    assert pick_replica(loads, exclude=["a", "b"]) is None


def test_capacity_counts_ready_replicas_only():
    cap = capacity([load("a", sessions=1), load("b", ready=False, sessions=2), load("c", placed=3)])
    assert (cap.replicas, cap.ready, cap.slots, cap.used, cap.free) == (3, 2, 4, 3, 1)
