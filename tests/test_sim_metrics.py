"""Tests of the simulator's leadership bookkeeping (``sim/_metrics.py``, ``LeaderBeliefs``).

The simulator used to count changes of the majority's leader: it reported 0 while the
festival scenario's nodes followed two different leaders in 80 of 122 samples (issue 10,
item 7). These tests pin down what is counted instead: each node's own belief.
"""

from __future__ import annotations

from types import SimpleNamespace

from sim._metrics import LeaderBeliefs, Metrics


def test_a_split_is_seen_and_each_node_change_is_counted() -> None:
    beliefs = LeaderBeliefs()
    assert beliefs.observe({"a": None, "b": None, "c": None}, 0.0) == 0
    assert beliefs.observe({"a": "x", "b": "x", "c": "y"}, 5.0) == 2  # first choices: no change
    assert beliefs.changes == 0
    # The majority's leader stays x throughout, but c flips and a flips: three changes.
    assert beliefs.observe({"a": "x", "b": "x", "c": "x"}, 10.0) == 1
    assert beliefs.observe({"a": "y", "b": "x", "c": "x"}, 15.0) == 2
    assert beliefs.observe({"a": "x", "b": "x", "c": "x"}, 20.0) == 1
    assert beliefs.changes == 3
    assert dict(beliefs.changes_by_node) == {"a": 2, "c": 1}
    assert beliefs.summary() == {
        "leader_changes": 3,
        "leader_split_samples": 2,
        "leader_samples": 5,
        "leaders_at_once_max": 2,
        "leader_longest_split_s": 0.0,
    }


def test_a_spell_without_a_leader_and_a_restart_are_not_changes() -> None:
    beliefs = LeaderBeliefs()
    beliefs.observe({"a": "x", "b": "x"}, 0.0)
    beliefs.observe({"a": None, "b": "x"}, 5.0)  # a lost sight of every candidate
    beliefs.observe({"a": "x", "b": "x"}, 10.0)  # ... and came back to the same one
    assert beliefs.changes == 0
    beliefs.observe({"a": None, "b": "x"}, 15.0)
    beliefs.observe({"a": "y", "b": "y"}, 20.0)  # back to another one: a change (and b's)
    assert beliefs.changes == 2
    beliefs.observe({"b": "y"}, 25.0)  # a stopped
    beliefs.observe({"a": "x", "b": "y"}, 30.0)  # a restarted and chose afresh
    assert beliefs.changes == 2


def test_the_longest_split_is_measured_in_time() -> None:
    beliefs = LeaderBeliefs()
    for t, split in [(0, False), (5, True), (10, True), (15, True), (20, False), (25, True)]:
        beliefs.observe({"a": "x", "b": "y" if split else "x"}, float(t))
    assert beliefs.split_samples == 4
    assert beliefs.summary()["leader_longest_split_s"] == 10.0


def test_metrics_read_the_running_nodes_beliefs() -> None:
    metrics = Metrics(lambda origin: {})
    metrics.running = {"a": SimpleNamespace(leader="x"), "b": SimpleNamespace(leader="y")}
    assert metrics.sample_leaders(5.0) == 2
    metrics.running["b"].leader = "x"
    assert metrics.sample_leaders(10.0) == 1
    assert metrics.leaders.changes == 1
