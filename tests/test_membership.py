"""Tests of the sans-IO membership, failure detector, gossip-target choice and election.

Time is virtual and passed in, so every transition is asserted at its exact
moment. Property tests (hypothesis) cover the merge's join laws and the
election's determinism and agreement; the rules they check are R1-R10 and invariants 1-10 in
the header of ``meshnode/_membership.py``.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import cbor2
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshnode._membership import (
    DIGEST_SIZE,
    MAX_COUNTER,
    MAX_NODE_ID_LEN,
    MAX_VERSION_LEN,
    MAX_WIRE_KEYS,
    MemberRecord,
    Membership,
    MembershipError,
    PeerState,
    choose_gossip_targets,
    choose_leader,
    elect_leader,
    retransmit_limit,
)

SELF = "self"
EPS = 1e-6


def rec(
    node_id: str,
    incarnation: int = 0,
    heartbeat: int = 0,
    score: int = 0,
    *,
    address: str = "10.0.0.1:5683",
    version: str = "0.1.0",
    leader: str | None = None,
) -> MemberRecord:
    return MemberRecord(node_id, incarnation, heartbeat, score, address, version, leader)


def membership(incarnation: int = 0, heartbeat: int = 0, score: int = 0, **kwargs: float) -> Membership:
    return Membership(rec(SELF, incarnation, heartbeat, score), **kwargs)


def wire(**changes: object) -> dict[str, object]:
    obj = rec("node-a", 3, 7, 80, address="192.168.1.5:5683", leader="node-b").to_wire()
    obj.update(changes)
    return obj


# --- records on the wire --------------------------------------------------------


def test_record_round_trips_through_cbor() -> None:
    record = rec("node-a", 3, 7, 80, address="[fe80::1]:5683", leader="node-b")
    assert MemberRecord.from_wire(cbor2.loads(cbor2.dumps(record.to_wire()))) == record
    plain = rec("node-a")
    assert plain.to_wire()["ldr"] is None
    assert MemberRecord.from_wire(plain.to_wire()) == plain


def test_from_wire_accepts_missing_leader_and_ignores_unknown_keys() -> None:
    obj = wire(future_field=[1, 2, 3])
    del obj["ldr"]
    record = MemberRecord.from_wire(obj)
    assert record.leader is None
    assert record.heartbeat == 7


@pytest.mark.parametrize("key", ["id", "inc", "hb", "up", "addr", "ver"])
def test_from_wire_rejects_a_missing_key(key: str) -> None:
    obj = wire()
    del obj[key]
    with pytest.raises(MembershipError, match=repr(key)):
        MemberRecord.from_wire(obj)


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("id", 5, "node_id must be a string"),
        ("id", b"node-a", "node_id must be a string"),
        ("inc", "1", "incarnation must be an integer"),
        ("inc", 1.0, "incarnation must be an integer"),
        ("hb", True, "heartbeat must be an integer"),
        ("up", None, "uplink_score must be an integer"),
        ("addr", b"10.0.0.1:5683", "address must be a string"),
        ("ver", ["0.1.0"], "version must be a string"),
        ("ldr", 3, "leader must be a string"),
        ("ldr", {"id": "x"}, "leader must be a string"),
    ],
)
def test_from_wire_rejects_wrong_types(key: str, value: object, complaint: str) -> None:
    with pytest.raises(MembershipError, match=complaint):
        MemberRecord.from_wire(wire(**{key: value}))


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("inc", -1, "incarnation must be between 0"),
        ("hb", -5, "heartbeat must be between 0"),
        ("inc", MAX_COUNTER + 1, "incarnation must be between 0"),
        ("hb", 2**64, "heartbeat must be between 0"),
        ("up", -1, "uplink_score must be between 0 and 100"),
        ("up", 101, "uplink_score must be between 0 and 100"),
    ],
)
def test_from_wire_rejects_numbers_out_of_range(key: str, value: int, complaint: str) -> None:
    with pytest.raises(MembershipError, match=complaint):
        MemberRecord.from_wire(wire(**{key: value}))


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("id", "n" * (MAX_NODE_ID_LEN + 1), "node_id is 129 characters long"),
        ("id", "x" * 1_000_000, "node_id is 1000000 characters long"),
        ("ver", "1" * (MAX_VERSION_LEN + 1), "version is 65 characters long"),
        ("addr", "h" * 10_000 + ":5683", "address is 10005 characters long"),
        ("ldr", "l" * (MAX_NODE_ID_LEN + 1), "leader is 129 characters long"),
        ("id", "", "node_id must not be empty"),
        ("ver", "", "version must not be empty"),
        ("id", "node a", "node_id must be printable and contain no whitespace"),
        ("id", "node\x00a", "node_id must be printable"),
        ("ver", "0.1\n", "version must be printable"),
    ],
)
def test_from_wire_rejects_bad_strings(key: str, value: str, complaint: str) -> None:
    with pytest.raises(MembershipError, match=complaint):
        MemberRecord.from_wire(wire(**{key: value}))


@pytest.mark.parametrize(
    "address",
    [
        "nohost",
        ":5683",
        "host:",
        "host:0",
        "host:65536",
        "host:080",
        "host:http",
        "::1:5683",
        "[::1:5683",
        "[]:5683",
    ],
)
def test_from_wire_rejects_malformed_addresses(address: str) -> None:
    with pytest.raises(MembershipError, match="address"):
        MemberRecord.from_wire(wire(addr=address))


@pytest.mark.parametrize("address", ["a:1", "10.0.0.1:5683", "charger-7.local:65535", "[::1]:5683"])
def test_from_wire_accepts_well_formed_addresses(address: str) -> None:
    assert MemberRecord.from_wire(wire(addr=address)).address == address


@pytest.mark.parametrize("obj", [None, [], ["node-a", 1, 2], "node-a", 5, b"\xa0", 1.5, {1, 2}])
def test_from_wire_rejects_non_maps(obj: object) -> None:
    with pytest.raises(MembershipError, match="must be a map"):
        MemberRecord.from_wire(obj)


def test_from_wire_rejects_maps_with_too_many_keys() -> None:
    obj = wire(**{f"k{i}": i for i in range(MAX_WIRE_KEYS)})
    with pytest.raises(MembershipError, match="keys, at most"):
        MemberRecord.from_wire(obj)


def test_membership_error_is_a_value_error_and_the_constructor_validates_too() -> None:
    assert issubclass(MembershipError, ValueError)
    with pytest.raises(MembershipError, match="uplink_score"):
        rec("node-a", score=150)
    with pytest.raises(MembershipError, match="address"):
        rec("node-a", address="no-port")


_garbage = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=10,
)
_wire_values = st.one_of(
    _garbage,
    st.integers(min_value=-2, max_value=102),
    st.sampled_from(["node-a", "10.0.0.1:5683", "0.1.0", "", " ", "a:0"]),
)


@given(
    st.one_of(
        _garbage,
        st.dictionaries(st.sampled_from(["id", "inc", "hb", "up", "addr", "ver", "ldr", "x"]), _wire_values),
    )
)
def test_from_wire_either_returns_a_valid_record_or_raises_membership_error(obj: object) -> None:
    try:
        record = MemberRecord.from_wire(obj)
    except MembershipError:
        return
    assert MemberRecord.from_wire(record.to_wire()) == record
    assert 0 <= record.uplink_score <= 100


# --- failure detection, with exact virtual times ----------------------------------


def test_peer_goes_alive_suspect_dead_forgotten_at_exact_times() -> None:
    m = membership()
    assert m.merge([rec("a", 0, 1)], now=100.0) == ["a"]
    assert m.state("a", 100.0) is PeerState.ALIVE
    assert m.state("a", 105.0 - EPS) is PeerState.ALIVE
    assert m.state("a", 105.0) is PeerState.SUSPECT
    assert m.state("a", 115.0 - EPS) is PeerState.SUSPECT
    assert m.state("a", 115.0) is PeerState.DEAD
    assert m.state("a", 415.0 - EPS) is PeerState.DEAD
    assert [(v.record.node_id, v.state, v.age) for v in m.view(415.0 - 1.0)] == [
        ("a", PeerState.DEAD, 314.0),
        (SELF, PeerState.ALIVE, 0.0),
    ]
    # Forgotten: out of the view, out of gossip; an unknown node counts as DEAD.
    assert m.state("a", 415.0) is PeerState.DEAD
    assert [v.record.node_id for v in m.view(415.0)] == [SELF]
    assert m.live_peers(415.0) == []
    assert m.state("never-heard-of", 0.0) is PeerState.DEAD


def test_live_peers_hold_alive_and_suspect_but_not_dead() -> None:
    m = membership()
    m.merge([rec("a", 0, 1), rec("b", 0, 1)], now=0.0)
    m.merge([rec("c", 0, 1)], now=10.0)
    m.merge([rec("b", 0, 2)], now=12.0)
    assert [r.node_id for r in m.live_peers(12.0)] == ["a", "b", "c"]
    assert m.state("a", 12.0) is PeerState.SUSPECT
    assert [r.node_id for r in m.live_peers(15.0)] == ["b", "c"]
    assert [(v.record.node_id, v.state) for v in m.view(15.0)] == [
        ("a", PeerState.DEAD),
        ("b", PeerState.ALIVE),
        ("c", PeerState.SUSPECT),
        (SELF, PeerState.ALIVE),
    ]


def test_a_heartbeat_advance_restarts_the_clock() -> None:
    m = membership()
    m.merge([rec("a", 0, 1)], now=100.0)
    assert m.merge([rec("a", 0, 2)], now=103.0) == ["a"]
    assert m.state("a", 108.0 - EPS) is PeerState.ALIVE
    assert m.state("a", 108.0) is PeerState.SUSPECT
    assert m.state("a", 118.0) is PeerState.DEAD


def test_stale_records_change_nothing() -> None:
    m = membership()
    m.merge([rec("a", 2, 5, 70)], now=100.0)
    stale = [rec("a", 2, 5, 70), rec("a", 2, 4, 90), rec("a", 1, 500, 90), rec("a", 0, 0)]
    assert m.merge(stale, now=104.0) == []
    assert m.live_peers(104.0) == [rec("a", 2, 5, 70)]
    # Relaying an old heartbeat is not evidence of life: the clock still runs from 100.
    assert m.state("a", 105.0) is PeerState.SUSPECT
    assert m.state("a", 115.0) is PeerState.DEAD


def test_a_restarted_peer_supersedes_its_older_record_with_a_higher_heartbeat() -> None:
    m = membership()
    m.merge([rec("a", 0, 500, 90, address="10.0.0.2:5683")], now=100.0)
    assert m.state("a", 112.0) is PeerState.SUSPECT
    restarted = rec("a", 1, 0, 60, address="10.0.0.9:5683")
    assert m.merge([restarted], now=112.0) == ["a"]
    assert m.live_peers(112.0) == [restarted]
    assert m.state("a", 117.0 - EPS) is PeerState.ALIVE
    assert m.state("a", 117.0) is PeerState.SUSPECT
    # ...and its old life cannot come back.
    assert m.merge([rec("a", 0, 501, 90)], now=113.0) == []
    assert m.live_peers(113.0) == [restarted]


def test_a_forgotten_peer_is_not_resurrected_by_stale_gossip_only_by_a_newer_record() -> None:
    m = membership()
    m.merge([rec("a", 0, 9)], now=0.0)
    assert m.records_for_gossip(415.0) == [m.self_record]
    assert m.merge([rec("a", 0, 9), rec("a", 0, 3)], now=416.0) == []
    assert m.state("a", 416.0) is PeerState.DEAD
    assert [v.record.node_id for v in m.view(416.0)] == [SELF]
    # A live node's heartbeat moves on: it comes back at once.
    assert m.merge([rec("a", 0, 10)], now=420.0) == ["a"]
    assert m.state("a", 420.0) is PeerState.ALIVE


def test_dead_records_are_shown_but_not_gossiped() -> None:
    m = membership()
    m.merge([rec("a", 0, 1), rec("b", 0, 1)], now=0.0)
    m.merge([rec("b", 0, 2)], now=14.0)
    m.tick(15.0)
    assert m.state("a", 15.0) is PeerState.DEAD
    assert [r.node_id for r in m.records_for_gossip(15.0)] == ["b", SELF]
    # Without an explicit time, the latest one the view was given (the tick) is used.
    assert [r.node_id for r in m.records_for_gossip()] == ["b", SELF]
    # A node that just joined hears nothing of the dead one.
    newcomer = Membership(rec("c"))
    newcomer.merge(m.records_for_gossip(), now=15.0)
    assert newcomer.state("a", 15.0) is PeerState.DEAD
    assert [r.node_id for r in newcomer.live_peers(15.0)] == ["b", SELF]


def test_records_for_gossip_before_any_time_is_just_ourselves() -> None:
    m = membership(heartbeat=4)
    assert m.records_for_gossip() == [rec(SELF, 0, 4)]


def test_next_deadline_walks_through_every_transition_then_the_tombstone() -> None:
    m = membership()
    assert m.next_deadline() is None
    m.merge([rec("a", 0, 1)], now=100.0)
    assert m.next_deadline() == 105.0
    m.tick(105.0)
    assert m.next_deadline() == 115.0
    m.tick(115.0)
    assert m.next_deadline() == 415.0
    m.tick(415.0)
    assert m.next_deadline() == 715.0
    # Still a tombstone just before its end: a stale copy is refused.
    assert m.merge([rec("a", 0, 1)], now=715.0 - EPS) == []
    m.tick(715.0)
    assert m.next_deadline() is None
    # The tombstone is gone; this is the documented bound on remembering a dead node.
    assert m.merge([rec("a", 0, 1)], now=716.0) == ["a"]


def test_custom_timeouts_are_honoured() -> None:
    m = membership(suspect_after=2.0, dead_after=3.0, forget_after=1.0)
    m.merge([rec("a", 0, 1)], now=10.0)
    assert m.state("a", 12.0 - EPS) is PeerState.ALIVE
    assert m.state("a", 12.0) is PeerState.SUSPECT
    assert m.state("a", 13.0) is PeerState.DEAD
    assert m.state("a", 14.0 - EPS) is PeerState.DEAD
    assert [v.record.node_id for v in m.view(14.0)] == [SELF]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"suspect_after": 0.0},
        {"suspect_after": 15.0},
        {"suspect_after": 20.0, "dead_after": 10.0},
        {"forget_after": 0.0},
        {"dead_after": float("inf")},
    ],
)
def test_bad_timeouts_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="need 0 <"):
        membership(**kwargs)


def test_direct_exchange_counts_as_evidence_by_id_or_address() -> None:
    m = membership()
    m.merge([rec("a", 0, 1, address="10.0.0.2:5683"), rec("b", 0, 1, address="10.0.0.3:5683")], now=0.0)
    assert m.observe_direct("a", now=4.0) is True
    assert m.observe_direct("10.0.0.3:5683", now=6.0) is True
    assert m.state("a", 9.0 - EPS) is PeerState.ALIVE
    assert m.state("a", 9.0) is PeerState.SUSPECT
    assert m.state("b", 11.0 - EPS) is PeerState.ALIVE
    assert m.state("b", 21.0) is PeerState.DEAD
    assert m.observe_direct("b", now=22.0) is True
    assert m.state("b", 22.0) is PeerState.ALIVE
    assert [v.age for v in m.view(23.0) if v.record.node_id == "b"] == [1.0]
    assert m.observe_direct("unknown", now=23.0) is False
    assert m.observe_direct("10.9.9.9:1", now=23.0) is False
    # A forgotten peer is not brought back by talking to it; its next heartbeat does that.
    assert m.observe_direct("a", now=1000.0) is False
    assert m.state("a", 1000.0) is PeerState.DEAD


# --- our own record -----------------------------------------------------------


def test_tick_bumps_the_heartbeat_and_returns_the_new_record() -> None:
    m = membership(incarnation=2, heartbeat=0)
    assert m.tick(1.0) == rec(SELF, 2, 1)
    assert m.tick(2.0) == rec(SELF, 2, 2)
    assert m.self_record == rec(SELF, 2, 2)
    assert m.node_id == SELF


def test_tick_at_the_heartbeat_ceiling_rolls_into_a_new_incarnation() -> None:
    m = membership(incarnation=2, heartbeat=MAX_COUNTER)
    assert m.tick(1.0).key == (3, 0)


def test_every_change_of_our_record_raises_its_key() -> None:
    m = membership(heartbeat=10)
    assert m.set_uplink_score(80) == rec(SELF, 0, 11, 80)
    assert m.set_uplink_score(80) == rec(SELF, 0, 11, 80)  # no change, no bump
    assert m.set_address("10.0.0.7:5684").key == (0, 12)
    assert m.set_address("10.0.0.7:5684").key == (0, 12)
    assert m.set_leader("a").key == (0, 13)
    assert m.set_leader("a").key == (0, 13)
    assert m.set_leader(None) == rec(SELF, 0, 14, 80, address="10.0.0.7:5684")
    with pytest.raises(MembershipError):
        m.set_uplink_score(101)
    with pytest.raises(MembershipError):
        m.set_address("no port")
    assert m.self_record.key == (0, 14)


def test_restart_starts_a_higher_incarnation_at_heartbeat_zero() -> None:
    m = membership(incarnation=4, heartbeat=77)
    assert m.restart(9) == rec(SELF, 9, 0)
    assert m.restart() == rec(SELF, 10, 0)
    with pytest.raises(ValueError, match="above the current 10"):
        m.restart(10)
    with pytest.raises(ValueError, match="above the current 10"):
        m.restart(3)
    assert m.self_record.key == (10, 0)


def test_a_record_about_us_with_a_higher_incarnation_is_refuted() -> None:
    m = membership(incarnation=1, heartbeat=3)
    assert m.merge([rec(SELF, 4, 7, 90, address="10.0.0.99:1")], now=0.0) == [SELF]
    assert m.self_record == rec(SELF, 5, 0)  # our own fields, a winning key
    # Our own record echoed back, or an older one of ours, is nothing to refute.
    assert m.merge([m.self_record, rec(SELF, 1, 3), rec(SELF, 4, 7)], now=1.0) == []
    assert m.self_record.key == (5, 0)


def test_a_node_that_forgot_its_incarnation_refutes_its_old_life() -> None:
    # Restarted at (0, 0) without the persisted incarnation; peers still gossip (0, 500).
    m = membership(incarnation=0, heartbeat=0)
    assert m.merge([rec(SELF, 0, 500)], now=0.0) == [SELF]
    assert m.self_record.key == (1, 0)
    # Every peer takes the new life over the old one.
    observer = Membership(rec("observer"))
    observer.merge([rec(SELF, 0, 500)], now=0.0)
    assert observer.merge([m.self_record], now=1.0) == [SELF]


def test_a_conflicting_record_about_us_at_our_own_key_is_refuted() -> None:
    m = membership(incarnation=2, heartbeat=5, score=40)
    assert m.merge([rec(SELF, 2, 5, 41)], now=0.0) == [SELF]
    assert m.self_record.key == (3, 0)
    assert m.self_record.uplink_score == 40


# --- merge laws (hypothesis) -----------------------------------------------------

_ids = st.sampled_from(["a", "b", "c", "d"])
_records = st.builds(
    MemberRecord,
    node_id=_ids,
    incarnation=st.integers(0, 3),
    heartbeat=st.integers(0, 4),
    uplink_score=st.integers(0, 100),
    address=st.sampled_from(["10.0.0.1:5683", "10.0.0.2:5683"]),
    version=st.sampled_from(["0.1.0", "0.2.0"]),
    leader=st.sampled_from([None, "a", "b"]),
)
_with_self = st.one_of(_records, _records.map(lambda r: replace(r, node_id=SELF)))


def _merged(batches: list[list[MemberRecord]], now: float = 50.0) -> Membership:
    m = membership(incarnation=1, heartbeat=2)
    for batch in batches:
        m.merge(batch, now)
    return m


def _peer_view(m: Membership, now: float = 50.0) -> list[tuple[object, ...]]:
    return [(v.record, v.state, v.age) for v in m.view(now) if v.record.node_id != SELF]


@settings(max_examples=300, deadline=None)
@given(st.lists(_records, max_size=20), st.randoms(use_true_random=False))
def test_merge_is_commutative(records: list[MemberRecord], rnd: random.Random) -> None:
    shuffled = records[:]
    rnd.shuffle(shuffled)
    assert _peer_view(_merged([records])) == _peer_view(_merged([shuffled]))
    one_by_one = _merged([[r] for r in records])
    assert _peer_view(one_by_one) == _peer_view(_merged([[r] for r in reversed(records)]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_records, max_size=8), st.lists(_records, max_size=8), st.lists(_records, max_size=8))
def test_merge_is_associative(a: list[MemberRecord], b: list[MemberRecord], c: list[MemberRecord]) -> None:
    left = _merged([a + b, c])
    right = _merged([a, b + c])
    flat = _merged([a + b + c])
    assert _peer_view(left) == _peer_view(right) == _peer_view(flat)


@settings(max_examples=300, deadline=None)
@given(st.lists(_records, max_size=20))
def test_merge_is_idempotent(records: list[MemberRecord]) -> None:
    m = _merged([records])
    before = m.view(50.0)
    assert m.merge(records, 50.0) == []
    assert m.merge(records + records, 50.0) == []
    assert m.view(50.0) == before
    assert _peer_view(_merged([records + records])) == _peer_view(m)


@settings(max_examples=300, deadline=None)
@given(st.lists(_with_self, max_size=20), st.randoms(use_true_random=False))
def test_records_about_us_never_leave_us_behind_whatever_the_order(
    records: list[MemberRecord], rnd: random.Random
) -> None:
    shuffled = records[:]
    rnd.shuffle(shuffled)
    for order in (records, shuffled):
        m = _merged([order])
        own = m.self_record
        assert own.key >= (1, 2)
        for r in order:
            if r.node_id == SELF:
                assert r == own or r.key < own.key
    assert _peer_view(_merged([records])) == _peer_view(_merged([shuffled]))


@settings(max_examples=200, deadline=None)
@given(st.lists(_records, max_size=12), st.lists(_records, max_size=12))
def test_two_nodes_that_exchange_gossip_agree_on_their_peers(a: list[MemberRecord], b: list[MemberRecord]) -> None:
    x = Membership(rec("x"))
    y = Membership(rec("y"))
    x.merge(a, 0.0)
    y.merge(b, 0.0)
    x.merge(y.records_for_gossip(0.0), 0.0)
    y.merge(x.records_for_gossip(0.0), 0.0)
    others = {"x", "y"}
    assert [r for r in x.records_for_gossip(0.0) if r.node_id not in others] == [
        r for r in y.records_for_gossip(0.0) if r.node_id not in others
    ]


# --- election -------------------------------------------------------------------


def test_no_candidate_means_no_leader() -> None:
    assert elect_leader([], None) is None
    assert elect_leader([("a", 49), ("b", 0)], None) is None
    assert elect_leader([("a", 49)], "a") is None


def test_threshold_is_inclusive_and_configurable() -> None:
    assert elect_leader([("a", 50), ("b", 49)], None) == "a"
    assert elect_leader([("a", 50), ("b", 49)], None, threshold=51) is None
    assert elect_leader([("a", 30), ("b", 5)], None, threshold=0) == "a"
    assert elect_leader([("a", 10), ("b", 5)], None, threshold=0) == "b"  # same bucket: the id decides


def test_highest_bucket_wins_and_node_id_breaks_ties_within_a_bucket() -> None:
    assert elect_leader([("a", 95), ("b", 81)], None) == "b"  # both in bucket 4
    assert elect_leader([("a", 100), ("z", 99)], None) == "a"  # bucket 5 beats 4
    assert elect_leader([("z", 79), ("a", 80)], None) == "a"
    assert elect_leader([("a", 79), ("b", 79)], None, bucket_size=1) == "b"
    assert elect_leader([("a", 60), ("a", 99)], None) == "a"  # listed twice: the higher score counts


def test_stickiness_keeps_a_healthy_leader_until_beaten_by_a_whole_bucket() -> None:
    assert elect_leader([("a", 60), ("b", 79)], None) == "b"
    assert elect_leader([("a", 60), ("b", 79)], "a") == "a"  # a better bucket, but not by 20 points
    assert elect_leader([("a", 60), ("b", 80)], "a") == "b"
    assert elect_leader([("a", 50), ("z", 69)], "a") == "a"
    # Of the challengers that beat the incumbent by a bucket, the best by (bucket, id) takes over.
    assert elect_leader([("i", 61), ("z", 80), ("a", 99)], "i") == "a"
    assert elect_leader([("i", 60), ("z", 80), ("a", 99)], "i") == "z"


def test_leadership_moves_when_the_leader_drops_below_threshold_or_disappears() -> None:
    assert elect_leader([("a", 49), ("b", 55)], "a") == "b"
    assert elect_leader([("b", 55), ("c", 51)], "a") == "c"
    assert elect_leader([("b", 55), ("c", 51)], "gone") == "c"


def test_bad_election_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="0-100"):
        elect_leader([("a", 101)], None)
    with pytest.raises(ValueError, match="0-100"):
        elect_leader([("a", True)], None)
    with pytest.raises(ValueError, match="bucket_size"):
        elect_leader([("a", 60)], None, bucket_size=0)
    with pytest.raises(ValueError, match="strings"):
        elect_leader([(1, 60)], None)  # type: ignore[list-item]


_candidates = st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 100)), max_size=10)


@settings(max_examples=300, deadline=None)
@given(_candidates, st.sampled_from([None, "a", "b", "zz"]), st.randoms(use_true_random=False))
def test_election_is_deterministic_and_independent_of_candidate_order(
    candidates: list[tuple[str, int]], current: str | None, rnd: random.Random
) -> None:
    shuffled = candidates[:]
    rnd.shuffle(shuffled)
    result = elect_leader(candidates, current)
    assert result == elect_leader(shuffled, current) == elect_leader(candidates, current)
    best = {}
    for nid, score in candidates:
        best[nid] = max(score, best.get(nid, 0))
    if result is None:
        assert all(score < 50 for score in best.values())
    else:
        assert best[result] >= 50


@settings(max_examples=300, deadline=None)
@given(
    st.integers(50, 100),
    st.lists(st.tuples(st.sampled_from("bcdefg"), st.integers(0, 100)), max_size=8),
)
def test_an_incumbent_above_threshold_stays_against_anyone_less_than_a_bucket_better(
    incumbent_score: int, others: list[tuple[str, int]]
) -> None:
    challengers = [(nid, min(score, incumbent_score + 19)) for nid, score in others]
    assert elect_leader([("a", incumbent_score), *challengers], "a") == "a"


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32), st.integers(58, 92), st.integers(-3, 3))
def test_jittering_scores_never_move_the_role_after_the_first_choice(seed: int, base_a: int, offset: int) -> None:
    # Two healthy uplinks of about equal quality (typical scores at most 3 apart),
    # each jittering by up to 8 points and never below the threshold: they cross
    # bucket boundaries all the time but are never a whole bucket (20) apart.
    rnd = random.Random(seed)
    base_b = min(max(base_a + offset, 58), 92)
    leader = None
    changes = 0
    for _ in range(200):
        scores = [("a", base_a + rnd.randint(-8, 8)), ("b", base_b + rnd.randint(-8, 8))]
        new = elect_leader(scores, leader)
        changes += new != leader
        leader = new
    assert changes == 1


# --- election through the membership view ------------------------------------------


def _node(node_id: str, score: int, leader: str | None = None) -> MemberRecord:
    return rec(node_id, 1, 1, score, leader=leader)


def _mesh(records: list[MemberRecord], now: float = 0.0) -> list[Membership]:
    nodes = []
    for record in records:
        m = Membership(record)
        m.merge(records, now)
        nodes.append(m)
    return nodes


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from("abcdefg"),
        st.tuples(st.integers(0, 100), st.sampled_from([None, "a", "b", "c", "d"])),
        min_size=1,
    )
)
def test_all_nodes_with_the_same_view_elect_the_same_leader(nodes: dict[str, tuple[int, str | None]]) -> None:
    records = [_node(nid, score, leader) for nid, (score, leader) in sorted(nodes.items())]
    mesh = _mesh(records)
    assert len({m.leader(0.0) for m in mesh}) == 1
    # When some eligible node claims the role, the nodes' differing memories do not matter.
    if any(r.leader == r.node_id and r.uplink_score >= 50 for r in records):
        assert len({m.leader(0.0, current=m.node_id) for m in mesh}) == 1


def test_a_published_claim_makes_the_incumbent_sticky_for_everyone() -> None:
    # b claims the role; a (70) and c (81) are better, but neither by a whole bucket (20 points).
    records = [_node("a", 70), _node("b", 62, leader="b"), _node("c", 81, leader="b")]
    mesh = _mesh(records)
    assert [m.leader(0.0) for m in mesh] == ["b", "b", "b"]
    # Without the claim, the plain order picks c (bucket 4).
    assert [m.leader(0.0) for m in _mesh([_node("a", 70), _node("b", 62), _node("c", 81)])] == ["c"] * 3


def test_two_leaders_after_a_healed_partition_settle_on_one() -> None:
    records = [_node("a", 70, leader="a"), _node("b", 75, leader="b"), _node("c", 0, leader="a")]
    mesh = _mesh(records)
    assert [m.leader(0.0, current=m.self_record.leader) for m in mesh] == ["b", "b", "b"]


def test_leadership_moves_once_the_leader_is_dead_not_while_it_is_suspect() -> None:
    """A leader that stopped heartbeating keeps the role while SUSPECT and stands down at DEAD (15 s):
    SUSPECT comes at different moments on different nodes (heartbeats travel several hops), and
    standing down then split the mesh between two leaders (issue 10, items 4 and 7)."""
    a = Membership(_node("a", 60, leader="b"))
    a.merge([_node("b", 90, leader="b"), _node("c", 55, leader="b")], now=0.0)
    assert a.leader(0.0) == "b"
    a.merge([rec("c", 1, 2, 55, leader="b")], now=14.9)
    assert a.state("b", 5.0) is PeerState.SUSPECT
    assert a.leader(5.0) == "b"
    assert a.leader(14.9) == "b"
    assert a.state("b", 15.0) is PeerState.DEAD
    assert a.leader(15.0) == "a"  # 60 in bucket 3 beats c's 55 in bucket 2
    # b heartbeats again: it is ALIVE and claims, but a claims too now; b's bucket (4) wins.
    a.set_leader("a")
    a.merge([rec("b", 1, 3, 90, leader="b")], now=16.0)
    assert a.leader(16.0) == "b"


def test_leadership_moves_when_the_leader_uplink_drops_below_threshold() -> None:
    a = Membership(_node("a", 60))
    a.merge([_node("b", 90, leader="b")], now=0.0)
    assert a.leader(0.0, current="b") == "b"
    a.merge([rec("b", 1, 2, 40, leader="b")], now=1.0)
    assert a.leader(1.0, current="b") == "a"
    a.set_uplink_score(10)
    assert a.leader(1.0, current="a") is None


# --- gossip targets ---------------------------------------------------------------


def test_gossip_targets_are_deterministic_for_a_seed() -> None:
    peers = [f"n{i}" for i in range(20)]
    first = choose_gossip_targets(random.Random(7), peers, 3)
    assert first == choose_gossip_targets(random.Random(7), peers, 3)
    assert len(first) == 3


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet="abcdef", min_size=1, max_size=3), max_size=15),
    st.integers(0, 20),
    st.lists(st.text(alphabet="abcdef", min_size=1, max_size=3), max_size=5),
    st.integers(0, 2**32),
    st.randoms(use_true_random=False),
)
def test_gossip_targets_respect_fanout_and_exclude_and_ignore_input_order(
    peers: list[str], fanout: int, exclude: list[str], seed: int, rnd: random.Random
) -> None:
    chosen = choose_gossip_targets(random.Random(seed), peers, fanout, exclude=exclude)
    eligible = set(peers) - set(exclude)
    assert len(chosen) == min(fanout, len(eligible))
    assert len(set(chosen)) == len(chosen)
    assert set(chosen) <= eligible
    shuffled = peers + peers
    rnd.shuffle(shuffled)
    assert choose_gossip_targets(random.Random(seed), shuffled, fanout, exclude=set(exclude)) == chosen


def test_gossip_targets_edge_cases_and_spread() -> None:
    assert choose_gossip_targets(random.Random(1), ["a", "b"], 0) == []
    assert sorted(choose_gossip_targets(random.Random(1), ["b", "a"], 5)) == ["a", "b"]
    assert choose_gossip_targets(random.Random(1), ["a", "b"], 3, exclude=["a", "b"]) == []
    with pytest.raises(ValueError, match="fanout"):
        choose_gossip_targets(random.Random(1), ["a"], -1)
    rng = random.Random(3)
    seen = set()
    for _ in range(200):
        seen.update(choose_gossip_targets(rng, ["a", "b", "c", "d", "e", "f"], 2, exclude=["c"]))
    assert seen == {"a", "b", "d", "e", "f"}


# --- invariants under arbitrary input sequences --------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("tick")),
        st.tuples(st.just("score"), st.integers(0, 100)),
        st.tuples(st.just("leader"), st.sampled_from([None, "a", SELF])),
        st.tuples(st.just("merge"), st.lists(_with_self, max_size=4)),
        st.tuples(st.just("direct"), st.sampled_from(["a", "b", "10.0.0.2:5683"])),
        st.tuples(st.just("wait"), st.floats(0.0, 5.0)),  # 40 x 5 s stays short of any forgetting
    ),
    max_size=40,
)

_ops_long = st.lists(
    st.one_of(
        st.tuples(st.just("tick")),
        st.tuples(st.just("score"), st.integers(0, 100)),
        st.tuples(st.just("leader"), st.sampled_from([None, "a", "b", SELF])),
        st.tuples(st.just("merge"), st.lists(_with_self, max_size=4)),
        st.tuples(st.just("direct"), st.sampled_from(["a", "b", "c", "10.0.0.2:5683"])),
        st.tuples(st.just("wait"), st.sampled_from([0.0, 1.0, 4.9, 5.0, 10.0, 15.0, 300.0, 315.0, 700.0])),
        st.tuples(st.just("piggyback"), st.integers(1, 5)),
        st.tuples(st.just("deadline")),
    ),
    max_size=50,
)


def _first_transition(last_seen: float, now: float) -> float:
    # R3 with the default timeouts, written out independently of the module.
    for t in (last_seen + 5.0, last_seen + 15.0, last_seen + 315.0, last_seen + 615.0):
        if t > now:
            return t
    return math.inf


@settings(max_examples=400, deadline=None)
@given(_ops_long)
# Seen at 4.9 s, asked at 19.9 s: 19.9 - 4.9 < 15 but 4.9 + 15 == 19.9 in floats, so the verdict
# (an age) and its cached change (a sum) disagreed and the view stayed SUSPECT past DEAD.
@example([("wait", 4.9), ("merge", [rec("a", 0, 0, 0, address="10.0.0.1:5683")]), ("wait", 15.0), ("wait", 1.0)])
def test_cached_verdicts_equal_a_fresh_evaluation_after_any_sequence(ops: list[tuple]) -> None:
    """R10: the caches (verdicts, live list, deadline, leader, digest) never go stale."""
    m = membership(incarnation=1)
    now = 0.0
    last_rows: frozenset[tuple[object, ...]] | None = None
    last_digest = b""
    for op in ops:
        if op[0] == "tick":
            m.tick(now)
        elif op[0] == "score":
            m.set_uplink_score(op[1])
        elif op[0] == "leader":
            m.set_leader(op[1])
        elif op[0] == "merge":
            m.merge(op[1], now)
        elif op[0] == "direct":
            m.observe_direct(op[1], now)
        elif op[0] == "piggyback":
            out = m.piggyback(now, op[1])
            assert out[0] == m.self_record and len(out) <= op[1]
            assert all(m.state(r.node_id, now) is not PeerState.DEAD for r in out)
        elif op[0] == "deadline":
            pass
        else:
            now += op[1]
        # The reference: every verdict straight from the rules, nothing cached.
        rows = [(r.record, m.state(r.record.node_id, now)) for r in m._view_at(now)]
        assert [(r.record, r.state) for r in m.view(now)] == rows
        live = [rec for rec, st_ in rows if rec.node_id != SELF and st_ is not PeerState.DEAD]
        assert m.live_peers(now) == live
        assert m.records_for_gossip(now) == [rec for rec, st_ in rows if st_ is not PeerState.DEAD]
        expected_leader = choose_leader(
            [
                (rec.node_id, rec.uplink_score, rec.leader == rec.node_id)
                for rec, st_ in rows
                if st_ is not PeerState.DEAD
            ]
        )
        assert m.leader(now) == expected_leader
        deadline = min((_first_transition(e.last_seen, now) for e in m._peers.values()), default=math.inf)
        assert m.next_deadline() == (None if deadline == math.inf else deadline)
        shown = frozenset(
            (
                rec.node_id,
                rec.incarnation,
                rec.leader == rec.node_id,
                rec.uplink_score >= 50,
                rec.uplink_score // 20,
            )
            for rec, st_ in rows
            if st_ is not PeerState.DEAD
        )
        digest = m.digest(now)
        assert len(digest) == DIGEST_SIZE
        if last_rows is not None:
            assert (digest == last_digest) == (shown == last_rows)
        last_rows, last_digest = shown, digest


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_own_and_peer_keys_never_go_back_and_gossip_holds_only_the_living(ops: list[tuple]) -> None:
    m = membership(incarnation=1)
    now = 0.0
    own = m.self_record.key
    peers: dict[str, tuple[int, int]] = {}
    for op in ops:
        if op[0] == "tick":
            assert m.tick(now).key > own
        elif op[0] == "score":
            m.set_uplink_score(op[1])
        elif op[0] == "leader":
            m.set_leader(op[1])
        elif op[0] == "merge":
            m.merge(op[1], now)
        elif op[0] == "direct":
            m.observe_direct(op[1], now)
        else:
            now += op[1]
        assert m.self_record.key >= own  # invariant 1
        own = m.self_record.key
        for row in m.view(now):  # invariant 2
            if row.record.node_id != SELF:
                assert row.record.key >= peers.get(row.record.node_id, (0, 0))
                peers[row.record.node_id] = row.record.key
        gossip = m.records_for_gossip(now)  # invariant 5
        assert all(m.state(r.node_id, now) is not PeerState.DEAD for r in gossip)
        assert m.self_record in gossip


@settings(max_examples=200, deadline=None)
@given(st.lists(_records, min_size=1, max_size=10), st.lists(st.floats(0.0, 800.0), min_size=2, max_size=12))
def test_without_new_evidence_a_peer_only_moves_towards_dead(records: list[MemberRecord], times: list[float]) -> None:
    order = {PeerState.ALIVE: 0, PeerState.SUSPECT: 1, PeerState.DEAD: 2}
    m = _merged([records], now=0.0)
    for node_id in {r.node_id for r in records}:
        states = [m.state(node_id, t) for t in sorted(times)]
        assert [order[s] for s in states] == sorted(order[s] for s in states)  # invariant 4


# --- delta gossip: piggyback, retransmit queue, digest (R9) ---------------------------


def test_retransmit_limit_is_memberlists_formula() -> None:
    assert [retransmit_limit(4, n) for n in (0, 1, 9, 10, 30, 99, 100, 200, 1000)] == [4, 4, 4, 8, 8, 8, 12, 12, 16]
    assert retransmit_limit(2, 30) == 4


def test_piggyback_starts_with_our_current_record_and_respects_the_limit() -> None:
    m = membership(incarnation=1)
    m.merge([rec(f"p{i}", 1, 1) for i in range(10)], 0.0)
    m.tick(0.5)
    for limit in (1, 2, 5, 30):
        out = m.piggyback(0.5, limit)
        assert out[0] == m.self_record and out[0].heartbeat == 1
        assert len(out) <= limit
    with pytest.raises(ValueError):
        m.piggyback(0.5, 0)


def test_each_update_is_piggybacked_at_most_the_retransmit_limit_then_dropped() -> None:
    m = membership(incarnation=1)
    m.merge([rec(f"p{i}", 1, 1) for i in range(20)], 0.0)  # 21 live members: 4 * ceil(log10(22)) = 8
    assert m.pending_updates() == 20
    sent: dict[str, int] = {}
    for _ in range(100):
        for r in m.piggyback(1.0, 6)[1:]:
            sent[r.node_id] = sent.get(r.node_id, 0) + 1
    assert sent == {f"p{i}": 8 for i in range(20)}
    assert m.pending_updates() == 0
    assert m.piggyback(1.0, 6) == (m.self_record,)  # nothing new: our own record alone


def test_queued_updates_go_least_sent_first_then_newest_first() -> None:
    m = membership(incarnation=1)
    m.merge([rec("a", 1, 1)], 0.0)
    m.merge([rec("b", 1, 1)], 0.0)
    assert [r.node_id for r in m.piggyback(0.0, 2)] == [SELF, "b"]  # newest first
    assert [r.node_id for r in m.piggyback(0.0, 2)] == [SELF, "a"]  # least sent first
    m.merge([rec("c", 1, 1)], 0.0)
    assert [r.node_id for r in m.piggyback(0.0, 4)] == [SELF, "c", "b", "a"]


def test_a_newer_update_replaces_the_queued_one_and_its_count_starts_again() -> None:
    m = membership(incarnation=1)
    m.merge([rec("a", 1, 1, 10), rec("b", 1, 1, 10)], 0.0)
    for _ in range(3):
        m.piggyback(0.0, 3)
    m.merge([rec("a", 1, 2, 90)], 0.5)  # a's score changed: news again
    out = m.piggyback(0.5, 2)
    assert out == (m.self_record, rec("a", 1, 2, 90))  # sent 0 times beats b's 3
    assert m.pending_updates() == 2  # one slot for a, not two


def test_what_merge_queues_news_only() -> None:
    m = membership(incarnation=1)
    m.merge([rec("a", 1, 1, 10)], 0.0)
    for _ in range(10):
        m.piggyback(0.0, 5)
    assert m.pending_updates() == 0
    m.merge([rec("a", 1, 1, 10)], 0.5)  # a repeat
    m.merge([rec("a", 1, 0, 10)], 0.5)  # stale
    assert m.pending_updates() == 0
    m.merge([rec("a", 1, 2, 10)], 1.0)  # a heartbeat: a refresh, not queued news
    assert m.pending_updates() == 0
    for change in ({"incarnation": 2, "heartbeat": 0}, {"uplink_score": 11}, {"leader": "a"},
                   {"address": "10.0.0.9:5683"}, {"version": "9"}):  # fmt: skip
        before = m.view(1.0)[0].record
        m.merge([replace(before, **{"heartbeat": before.heartbeat + 1, **change})], 1.0)
        assert m.pending_updates() == 1, change
        for _ in range(10):
            m.piggyback(1.0, 5)
    # Back from SUSPECT or DEAD: a refresh (mostly our own timeout on a far node);
    # back from forgotten: news.
    m.merge([rec("a", 2, 49, 11, leader="a", address="10.0.0.9:5683", version="9")], 7.0)
    assert m.pending_updates() == 0
    assert m.piggyback(7.0, 5)[1:] == (rec("a", 2, 49, 11, leader="a", address="10.0.0.9:5683", version="9"),)
    m.merge([rec("a", 2, 50, 11, leader="a", address="10.0.0.9:5683", version="9")], 30.0)
    assert m.pending_updates() == 0
    assert m.piggyback(30.0, 5)[1:] == (rec("a", 2, 50, 11, leader="a", address="10.0.0.9:5683", version="9"),)
    assert m.state("a", 400.0) is PeerState.DEAD and "a" not in {r.record.node_id for r in m.view(400.0)}
    m.merge([rec("a", 2, 51, 11, leader="a", address="10.0.0.9:5683", version="9")], 400.0)
    assert m.pending_updates() == 1


def test_a_heartbeat_refresh_is_passed_on_once_per_advance_after_queued_news() -> None:
    m = membership(incarnation=1)
    m.merge([rec("a", 1, 1), rec("b", 1, 1)], 0.0)
    for _ in range(10):
        m.piggyback(0.0, 5)
    m.merge([rec("a", 1, 2)], 1.0)
    m.merge([rec("b", 1, 2)], 1.1)
    assert m.piggyback(1.1, 2) == (m.self_record, rec("a", 1, 2))  # waiting longest first
    assert m.piggyback(1.1, 5) == (m.self_record, rec("b", 1, 2))
    assert m.piggyback(1.1, 5) == (m.self_record,)
    m.merge([rec("c", 1, 1)], 1.2)  # news outranks refreshes
    m.merge([rec("a", 1, 3)], 1.2)
    assert m.piggyback(1.2, 2) == (m.self_record, rec("c", 1, 1))


def test_dead_members_are_never_piggybacked() -> None:
    m = membership(incarnation=1)
    m.merge([rec("a", 1, 1), rec("b", 1, 1)], 0.0)
    m.merge([rec("b", 1, 2)], 10.0)
    out = m.piggyback(15.0, 10)  # a is DEAD at 15 s
    assert [r.node_id for r in out] == [SELF, "b"]
    assert m.pending_updates() == 1  # a's queued update went with it


def _digest_of(records: list[MemberRecord], now: float = 0.0, **kwargs: int) -> bytes:
    m = Membership(records[0], **kwargs)
    m.merge(records[1:], now)
    return m.digest(now)


def test_digest_covers_members_incarnations_claims_and_score_buckets_but_not_heartbeats() -> None:
    base = [rec("a", 1, 1, 90, leader="a"), rec("b", 1, 1, 40, leader="a"), rec("c", 2, 7, 65, leader="a")]
    d = _digest_of(base)
    assert len(d) == DIGEST_SIZE
    assert _digest_of([base[0], base[2], base[1]]) == d  # order of arrival
    assert _digest_of([replace(r, heartbeat=r.heartbeat + 9) for r in base]) == d
    assert _digest_of([base[0], base[1], replace(base[2], uplink_score=79)]) == d  # same bucket (3)
    assert _digest_of([base[0], base[1], replace(base[2], leader="b")]) == d  # follows someone else: no claim
    for changed in (
        [base[0], base[1]],  # a member fewer
        [base[0], base[1], replace(base[2], incarnation=3)],
        [base[0], base[1], replace(base[2], uplink_score=80)],  # bucket 3 -> 4
        [base[0], base[1], replace(base[2], leader="c")],  # a claim
        [base[0], replace(base[1], uplink_score=50), base[2]],  # eligible, same bucket (2)
        [replace(base[0], node_id="z"), base[1], base[2]],
    ):
        assert _digest_of(changed) != d, changed


def test_digest_follows_liveness_not_suspicion() -> None:
    """SUSPECT is live (election, gossip) and begins at different moments on different
    nodes: two idle neighbours that differ only in it must not look different."""
    m = membership(incarnation=1)
    m.merge([rec("a", 1, 1, 90)], 0.0)
    alive = m.digest(1.0)
    assert m.state("a", 5.0) is PeerState.SUSPECT
    assert m.digest(5.0) == alive
    m.merge([rec("a", 1, 2, 90)], 6.0)
    assert m.digest(6.0) == alive
    assert m.digest(21.0) != alive  # DEAD: gone from the digest, as from gossip
    assert m.digest(21.0) == Membership(rec(SELF, 1, 0)).digest(21.0)


def test_refreshes_of_nodes_that_may_lead_go_first() -> None:
    """R9: with a budget too small for every refresh, eligible and claiming nodes'
    heartbeats are passed on before the others' (the election reads their liveness)."""
    m = membership(incarnation=1)
    low = [rec(f"p{i:02d}", 1, 1, 0) for i in range(10)]
    uplink = rec("up", 1, 1, 90)
    claimant = rec("zz", 1, 1, 60, leader="zz")
    m.merge([*low, uplink, claimant], 0.0)
    while m.pending_updates():  # drain the news (first sight) so only refreshes are left
        m.piggyback(0.0, 32)
    m.merge([replace(r, heartbeat=2) for r in low], 1.0)  # the ordinary ones advance first
    m.merge([replace(uplink, heartbeat=2), replace(claimant, heartbeat=2)], 1.0)
    out = m.piggyback(1.0, 4)
    assert [r.node_id for r in out] == [SELF, "up", "zz", "p00"]
    rest = m.piggyback(1.0, 32)
    assert [r.node_id for r in rest[1:]] == [f"p{i:02d}" for i in range(1, 10)]  # each advance once


# --- election agreement (R7, R8; issue 10 items 4 and 7) ----------------------------------


def test_nodes_that_see_the_leader_suspect_at_different_moments_still_agree() -> None:
    """Festival: the leader's heartbeat reached p 6 s ago and q 1 s ago; both still follow it."""
    leader = rec("b", 1, 5, 90, leader="b")
    p, q = Membership(rec("p", 1, 1, 60)), Membership(rec("q", 1, 1, 70))
    p.merge([leader], 0.0)
    q.merge([leader], 5.0)
    assert p.state("b", 6.0) is PeerState.SUSPECT and q.state("b", 6.0) is PeerState.ALIVE
    assert p.leader(6.0) == q.leader(6.0) == "b"


def test_what_followers_remember_does_not_keep_two_leaders() -> None:
    """Nobody claims yet; p last followed a (75), q last followed b (90): both take b."""
    records = [rec("a", 1, 1, 75), rec("b", 1, 1, 90), rec("p", 1, 1, 0, leader="a"), rec("q", 1, 1, 0, leader="b")]
    p, q = _mesh(records)[2:]
    assert p.leader(0.0, current="a") == q.leader(0.0, current="b") == "b"


def test_two_claimants_after_a_heal_the_worse_stands_down() -> None:
    """Issue 10 item 4: a (75) and b (90) both lead their halves; after the heal everyone takes b,
    a included, and b's claim keeps it even against c, which is better but less than a bucket."""
    records = [
        rec("a", 1, 1, 75, leader="a"), rec("f1", 1, 1, 0, leader="a"),
        rec("b", 1, 1, 90, leader="b"), rec("f2", 1, 1, 0, leader="b"), rec("c", 1, 1, 99, leader="b"),
    ]  # fmt: skip
    assert {m.leader(0.0) for m in _mesh(records)} == {"b"}
    # Two claimants in one bucket: the node id decides, not the score inside the bucket.
    records[0] = rec("a", 1, 1, 99, leader="a")
    assert {m.leader(0.0) for m in _mesh(records)} == {"b"}


def test_a_non_claimant_a_whole_bucket_better_takes_over_and_the_claimant_stands_down() -> None:
    records = [rec("a", 1, 1, 55, leader="a"), rec("b", 1, 1, 75), rec("c", 1, 1, 74)]
    mesh = _mesh(records)
    assert {m.leader(0.0) for m in mesh} == {"b"}  # 75 >= 55 + 20
    # b claims, a has not heard it yet... and then has: the answer stays b throughout.
    claimed = [records[0], rec("b", 1, 2, 75, leader="b"), records[2]]
    assert {m.leader(0.0) for m in _mesh(claimed)} == {"b"}
    stood_down = [rec("a", 1, 2, 55, leader="b"), rec("b", 1, 2, 75, leader="b"), records[2]]
    assert {m.leader(0.0) for m in _mesh(stood_down)} == {"b"}


@st.composite
def _meshes(draw: st.DrawFn) -> tuple[list[MemberRecord], list[tuple[int, int]], list[set[int]]]:
    n = draw(st.integers(2, 7))
    ids = [f"n{i}" for i in range(n)]
    records = [
        rec(ids[i], 1, 1, draw(st.integers(0, 100)), leader=draw(st.sampled_from([None, *ids]))) for i in range(n)
    ]
    edges = {(draw(st.integers(0, i - 1)), i) for i in range(1, n)}  # a random spanning tree: connected
    edges |= {tuple(sorted(e)) for e in draw(st.sets(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)),
                                                      max_size=n)) if e[0] != e[1]}  # fmt: skip
    known = [draw(st.sets(st.integers(0, n - 1))) for _ in range(n)]  # views start out different
    return records, sorted(edges), known


def _diameter(n: int, edges: list[tuple[int, int]]) -> int:
    adj: dict[int, set[int]] = {i: set() for i in range(n)}
    for u, v in edges:
        adj[u].add(v)
        adj[v].add(u)
    worst = 0
    for s in range(n):
        dist, frontier = {s: 0}, [s]
        while frontier:
            frontier = [
                v for u in frontier for v in adj[u] if v not in dist and not dist.setdefault(v, dist[u] + 1) < 0
            ]
        worst = max(worst, max(dist.values()))
    return worst


def _run_rounds(mesh: list[Membership], edges: list[tuple[int, int]], rounds: int, t0: float, delta: bool
                ) -> tuple[float, list[list[str | None]]]:  # fmt: skip
    """Synchronous rounds of 0.5 s: every node ticks, elects and publishes, then every link exchanges
    (full lists, or piggyback plus a full exchange only when the digests differ)."""
    history = []
    now = t0
    for _ in range(rounds):
        now += 0.5
        for m in mesh:
            m.tick(now)
            m.set_leader(m.leader(now))
        history.append([m.self_record.leader for m in mesh])
        if delta:
            sent = [(u, v, mesh[u].piggyback(now, 3), mesh[v].piggyback(now, 3)) for u, v in edges]
            for u, v, from_u, from_v in sent:
                mesh[v].merge(from_u, now)
                mesh[u].merge(from_v, now)
                if mesh[u].digest(now) != mesh[v].digest(now):
                    a, b = mesh[u].records_for_gossip(now), mesh[v].records_for_gossip(now)
                    mesh[v].merge(a, now)
                    mesh[u].merge(b, now)
        else:
            sent_full = [(u, v, mesh[u].records_for_gossip(now), mesh[v].records_for_gossip(now)) for u, v in edges]
            for u, v, from_u, from_v in sent_full:
                mesh[v].merge(from_u, now)
                mesh[u].merge(from_v, now)
    return now, history


@settings(max_examples=150, deadline=None)
@given(_meshes(), st.booleans())
def test_a_connected_mesh_agrees_on_one_leader_within_the_bound_and_keeps_it(
    setup: tuple[list[MemberRecord], list[tuple[int, int]], list[set[int]]], delta: bool
) -> None:
    """R8's bound: records cross the mesh in d rounds (d: its diameter); after 2d + 2 rounds of
    tick, elect, publish and exchange, every node follows the same leader, and it stays."""
    records, edges, known = setup
    n = len(records)
    mesh = []
    for i, record in enumerate(records):
        m = Membership(record)
        m.merge([records[j] for j in sorted(known[i])], 0.0)
        mesh.append(m)
    d = _diameter(n, edges)
    now, _ = _run_rounds(mesh, edges, 2 * d + 2, 0.0, delta)
    leaders = {m.leader(now) for m in mesh}
    assert len(leaders) == 1, leaders
    (leader,) = leaders
    assert (leader is None) == all(r.uplink_score < 50 for r in records)
    _, later = _run_rounds(mesh, edges, d + 2, now, delta)
    assert all(row == [leader] * n for row in later)


@settings(max_examples=100, deadline=None)
@given(_meshes(), st.integers(1, 6))
def test_after_a_heal_two_halves_that_each_agreed_agree_on_one_leader_within_the_bound(
    setup: tuple[list[MemberRecord], list[tuple[int, int]], list[set[int]]], cut: int
) -> None:
    records, edges, _ = setup
    n = len(records)
    cut = min(cut, n - 1)
    halves = [set(range(cut)), set(range(cut, n))]
    mesh = [Membership(r) for r in records]
    inside = [e for e in edges if any(e[0] in h and e[1] in h for h in halves)]
    now, _ = _run_rounds(mesh, inside, 3 * n, 0.0, delta=False)  # each half settles on its own
    now, _ = _run_rounds(mesh, edges, 2 * _diameter(n, edges) + 2, now, delta=False)
    assert len({m.leader(now) for m in mesh}) == 1


def test_a_tie_break_on_a_dead_record_is_not_queued() -> None:
    m = membership(incarnation=1)
    m.merge([rec("a", 1, 5, 10)], 0.0)
    for _ in range(10):
        m.piggyback(0.0, 5)
    m.merge([rec("a", 1, 5, 99)], 20.0)  # same key, larger score: kept, but a is DEAD
    assert m.view(20.0)[0].record.uplink_score == 99
    assert m.pending_updates() == 0
    assert m.piggyback(20.0, 5) == (m.self_record,)


def test_the_wire_map_follows_every_change_of_our_record_and_copies_are_independent() -> None:
    m = membership(incarnation=1, score=10)
    first = m.self_record.to_wire()
    first["up"] = 99  # a caller's copy: changing it changes nothing
    assert m.self_record.to_wire()["up"] == 10
    m.set_uplink_score(20)
    m.set_leader(SELF)
    m.tick(1.0)
    assert m.self_record.to_wire() == {"id": SELF, "inc": 1, "hb": 3, "up": 20, "addr": "10.0.0.1:5683",
                                       "ver": "0.1.0", "ldr": SELF}  # fmt: skip
    assert MemberRecord.from_wire(m.self_record.to_wire()) == m.self_record


def test_the_queue_stays_bounded_when_nothing_is_piggybacked() -> None:
    """A node that merges news but never calls piggyback (gossip by full lists) keeps no backlog."""
    m = membership(incarnation=1)
    for hb in range(1, 2000):
        m.merge([rec("a", 1, hb, hb % 100), rec(f"p{hb % 7}", 1, hb, hb % 50)], hb * 0.01)
    assert m.pending_updates() == 8
    assert len(m._qheap) <= 2 * 8 + 65
    assert [r.node_id for r in m.piggyback(20.0, 3)] == [SELF, "p4", "a"]  # newest first (hb 1999: p4 after a)


def test_a_lazy_heartbeat_is_raised_when_sent_at_most_once_per_period() -> None:
    """An idle node ticks rarely; its record, when sent, still carries a heartbeat at most
    one period old, and sending often raises it no more than once per period."""
    m = membership(incarnation=1, heartbeat_period=1.0)
    first = m.piggyback(0.0, 4)[0]
    assert first.heartbeat == 1
    assert m.piggyback(0.5, 4)[0] == first  # within the period: the same record
    assert m.piggyback(1.0, 4)[0].heartbeat == 2
    m.tick(1.5)  # a tick counts as a raise
    assert m.piggyback(2.0, 4)[0].heartbeat == 3
    assert m.piggyback(9.0, 4)[0].heartbeat == 4  # one raise however long the silence
    plain = membership(incarnation=1)
    assert plain.piggyback(9.0, 4)[0].heartbeat == 0  # without a period: ticks only


@pytest.mark.parametrize("period", [0.0, -1.0, math.inf, math.nan])
def test_a_bad_heartbeat_period_is_refused(period: float) -> None:
    with pytest.raises(ValueError, match="heartbeat_period"):
        membership(heartbeat_period=period)


def test_a_refresh_is_passed_on_refresh_sends_times_round_robin() -> None:
    """R9 with ``refresh_sends``: each advance goes out that many times, the longest
    waiting first, so a heartbeat spreads as an epidemic rather than a single walk."""
    m = membership(incarnation=1, refresh_sends=2)
    m.merge([rec("a", 1, 1), rec("b", 1, 1)], 0.0)
    while m.pending_updates():
        m.piggyback(0.0, 8)
    m.merge([rec("a", 1, 2), rec("b", 1, 2)], 1.0)
    sent = [r.node_id for _ in range(4) for r in m.piggyback(1.0, 2)[1:]]
    assert sent == ["a", "b", "a", "b"]
    assert m.piggyback(1.0, 8) == (m.self_record,)
    with pytest.raises(ValueError, match="refresh_sends"):
        membership(refresh_sends=0)


# --- the SWIM detector (R11) ------------------------------------------------------


def swim(incarnation: int = 1, score: int = 0, node_id: str = SELF, **kwargs: object) -> Membership:
    return Membership(rec(node_id, incarnation, 0, score), detector="swim", **kwargs)  # type: ignore[arg-type]


def test_swim_a_peer_stays_alive_without_heartbeats_until_someone_suspects_it() -> None:
    m = swim()
    m.merge([rec("a", 1, 0)], 0.0)
    assert m.state("a", 10_000.0) is PeerState.ALIVE
    assert m.next_deadline() is None
    before = m.self_record
    assert m.tick(50.0) == before  # no heartbeats: an idle record never changes
    assert [r.node_id for r in m.piggyback(60.0, 8)] == [SELF, "a"]  # the news (a new member) ...
    while m.pending_updates():
        m.piggyback(60.0, 8)
    assert m.piggyback(70.0, 8) == (before,)  # ... and then nothing: no refreshes
    assert [r.node_id for r in m.live_peers(10_000.0)] == ["a"]


def test_swim_a_failed_probe_suspects_then_kills_at_exact_times_and_spreads_the_suspicion() -> None:
    m = swim(suspicion_timeout=10.0, forget_after=300.0)
    m.merge([rec("a", 1, 4, 70)], 0.0)
    while m.pending_updates():
        m.piggyback(0.0, 8)
    assert m.suspect("a", 5.0)
    assert not m.suspect("a", 6.0)  # already suspected
    assert not m.suspect("zz", 6.0)  # unknown
    assert m.state("a", 5.0) is PeerState.SUSPECT
    assert [r.node_id for r in m.live_peers(5.0)] == ["a"]  # SUSPECT still counts (R7)
    sent = m.piggyback(5.0, 8)[1]
    assert (sent.node_id, sent.incarnation, sent.status) == ("a", 1, 1)
    assert sent.to_wire()["st"] == 1
    assert m.next_deadline() == 15.0
    assert m.state("a", 15.0 - EPS) is PeerState.SUSPECT
    assert m.state("a", 15.0) is PeerState.DEAD
    assert m.live_peers(15.0) == [] and m.leader(15.0) is None
    death = [r for r in m.records_for_gossip(15.0) if r.node_id == "a"]
    assert [(r.incarnation, r.status) for r in death] == [(1, 2)]  # the death notice is what we tell
    assert m.next_deadline() == 315.0
    assert m.state("a", 315.0) is PeerState.DEAD and [v.record.node_id for v in m.view(315.0)] == [SELF]
    assert m.next_deadline() == 615.0
    m.view(615.0)
    assert m.next_deadline() is None and "a" not in m._peers


def test_swim_the_heartbeat_detector_ignores_suspect() -> None:
    m = membership(incarnation=1)
    m.merge([rec("a", 1, 1)], 0.0)
    assert not m.suspect("a", 1.0)
    assert m.state("a", 1.0) is PeerState.ALIVE


def test_swim_a_suspected_node_refutes_with_a_new_incarnation_which_clears_the_suspicion() -> None:
    a, b = swim(node_id="a", score=80), swim(node_id="b")
    b.merge([a.self_record], 0.0)
    b.suspect("a", 1.0)
    (suspicion,) = [r for r in b.piggyback(1.0, 8) if r.node_id == "a"]
    assert a.merge([suspicion], 2.0) == ["a"]
    assert (a.self_record.incarnation, a.self_record.heartbeat, a.self_record.status) == (2, 0, 0)
    assert b.merge([a.piggyback(2.0, 8)[0]], 3.0) == ["a"]
    assert b.state("a", 3.0) is PeerState.ALIVE
    assert b.next_deadline() is None
    assert b.state("a", 100.0) is PeerState.ALIVE
    # An older suspicion (a past incarnation) changes nothing, on a or on b.
    assert a.merge([suspicion], 4.0) == [] and a.self_record.incarnation == 2
    assert b.merge([suspicion], 4.0) == [] and b.state("a", 4.0) is PeerState.ALIVE
    # A death notice at our incarnation is refuted the same way.
    a.merge([replace(a.self_record, status=2)], 5.0)
    assert a.self_record.incarnation == 3


def test_swim_a_suspicion_heard_starts_our_own_timer_once_and_the_nodes_own_changes_do_not_clear_it() -> None:
    m = swim(suspicion_timeout=10.0)
    m.merge([rec("a", 1, 3, 60)], 0.0)
    m.merge([rec("a", 1, 3, 60).__class__("a", 1, 3, 60, "10.0.0.1:5683", "0.1.0", None, 1)], 2.0)
    assert m.state("a", 2.0) is PeerState.SUSPECT
    m.merge([MemberRecord("a", 1, 2, 60, "10.0.0.1:5683", "0.1.0", None, 1)], 8.0)  # the same suspicion again
    m.merge([rec("a", 1, 9, 90)], 9.0)  # a's own change at the same incarnation: not a refutation
    assert m.state("a", 11.9) is PeerState.SUSPECT
    assert m.state("a", 12.0) is PeerState.DEAD  # 10 s from the first time we heard it


def test_swim_a_death_notice_kills_at_once_stale_records_do_not_revive_and_a_new_incarnation_does() -> None:
    m = swim()
    m.merge([rec("a", 1, 3, 60)], 0.0)
    m.merge([MemberRecord("zz", 1, 0, 0, "10.0.0.9:5683", "0.1.0", None, 2)], 0.0)
    m.merge([rec("zz", 1, 0)], 0.0)  # its life at that incarnation, heard after its death
    assert m.state("zz", 0.0) is PeerState.DEAD  # a stranger's death is kept: order does not matter
    m.merge([MemberRecord("a", 1, 0, 60, "10.0.0.1:5683", "0.1.0", None, 2)], 1.0)
    assert m.state("a", 1.0) is PeerState.DEAD
    m.merge([rec("a", 1, 50, 60)], 2.0)  # a stale copy of its life at that incarnation
    assert m.state("a", 2.0) is PeerState.DEAD
    m.merge([rec("a", 2, 0, 60)], 3.0)
    assert m.state("a", 3.0) is PeerState.ALIVE
    assert m.next_deadline() == 300.0  # zz's: forgotten 300 s after its death


def test_swim_a_direct_answer_requeues_our_suspicion_so_the_node_hears_it_and_clears_a_tombstone() -> None:
    m = swim(suspicion_timeout=10.0, forget_after=100.0)
    m.merge([rec("a", 1, 0), rec("b", 1, 0)], 0.0)
    m.suspect("a", 1.0)
    while m.pending_updates():
        m.piggyback(1.0, 8)
    assert m.observe_direct("a", 2.0)
    assert [(r.node_id, r.status) for r in m.piggyback(2.0, 8)[1:]] == [("a", 1)]
    m.suspect("b", 1.0)
    m.view(200.0)  # b forgotten (a too)
    assert m.state("b", 200.0) is PeerState.DEAD and "b" in m._peers  # a tombstone
    m.merge([rec("b", 1, 0)], 200.0)
    assert "b" not in {r.node_id for r in m.live_peers(200.0)}  # the tombstone holds ...
    assert not m.observe_direct("b", 201.0)  # ... until b answers us directly
    m.merge([rec("b", 1, 0)], 202.0)
    assert m.state("b", 202.0) is PeerState.ALIVE


def test_swim_idle_peers_that_heard_the_same_have_the_same_digest_and_a_repair_goes_round_the_view() -> None:
    records = [rec(f"p{i:02d}", 1, 0, 10 * i) for i in range(10)]
    m, n = swim(), swim()
    m.merge(records, 0.0)
    n.merge(records, 0.0)
    assert m.digest(0.0) == n.digest(0.0)
    while m.pending_updates():
        m.piggyback(0.0, 32)
    m.suspect("p03", 1.0)
    m.view(20.0)  # p03 DEAD here
    seen: list[str] = []
    for _ in range(5):
        seen += [r.node_id for r in m.piggyback(20.0, 4, repair=True)[1:]]
    assert seen[0] == "p03"  # the news first (its suspicion, now a death notice) ...
    assert sorted(set(seen)) == [r.node_id for r in records]  # ... then slices of the whole view
    n.merge(m.records_for_gossip(20.0), 20.0)
    assert n.state("p03", 20.0) is PeerState.DEAD
    assert m.digest(20.0) == n.digest(20.0)
    assert m.digest(1000.0) == n.digest(1000.0)  # no heartbeats, no aging: an idle view stays equal


@pytest.mark.parametrize("bad", [3, -1, True, "1", 1.0])
def test_swim_a_bad_status_on_the_wire_is_refused(bad: object) -> None:
    with pytest.raises(MembershipError, match="status"):
        MemberRecord.from_wire(wire(st=bad))


def test_swim_the_status_round_trips_and_is_absent_on_the_wire_when_alive() -> None:
    assert "st" not in rec("a").to_wire()
    suspicion = MemberRecord("a", 1, 2, 3, "10.0.0.1:5683", "0.1.0", None, 1)
    assert MemberRecord.from_wire(cbor2.loads(cbor2.dumps(suspicion.to_wire()))) == suspicion


def test_swim_a_bad_detector_or_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="detector"):
        membership(detector="gossip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="suspicion_timeout"):
        swim(suspicion_timeout=0.0)


_status_records = st.builds(
    MemberRecord,
    st.sampled_from(["a", "b", "c", SELF]),
    st.integers(0, 3),
    st.integers(0, 4),
    st.integers(0, 100),
    st.sampled_from(["10.0.0.1:5683", "10.0.0.2:5683"]),
    st.sampled_from(["0.1.0", "0.2.0"]),
    st.sampled_from([None, "a", "b"]),
    st.integers(0, 2),
)


def _table(m: Membership, now: float) -> list[tuple[MemberRecord, PeerState]]:
    return [(v.record, v.state) for v in m.view(now)]


@settings(max_examples=300, deadline=None)
@given(st.lists(_status_records, max_size=20), st.randoms(use_true_random=False))
def test_swim_merge_order_does_not_matter(records: list[MemberRecord], rnd: random.Random) -> None:
    """Invariant 3 with suspicions and death notices: one `now`, any order or grouping."""
    a, b = swim(incarnation=5), swim(incarnation=5)
    a.merge(records, 1.0)
    shuffled = list(records) * 2
    rnd.shuffle(shuffled)
    for r in shuffled:
        b.merge([r], 1.0)
    assert _table(a, 1.0) == _table(b, 1.0)
    assert a.digest(1.0) == b.digest(1.0) and a.leader(1.0) == b.leader(1.0)
    assert _table(a, 30.0) == _table(b, 30.0)


@settings(max_examples=150, deadline=None)
@given(_meshes(), st.booleans())
def test_swim_a_connected_mesh_agrees_on_one_leader_within_the_bound_and_keeps_it(
    setup: tuple[list[MemberRecord], list[tuple[int, int]], list[set[int]]], delta: bool
) -> None:
    """R8's bound with the SWIM detector: the same 2d + 2 rounds (no heartbeats needed)."""
    records, edges, known = setup
    n = len(records)
    mesh = []
    for i, record in enumerate(records):
        m = Membership(record, detector="swim")
        m.merge([records[j] for j in sorted(known[i])], 0.0)
        mesh.append(m)
    d = _diameter(n, edges)
    now, _ = _run_rounds(mesh, edges, 2 * d + 2, 0.0, delta)
    leaders = {m.leader(now) for m in mesh}
    assert len(leaders) == 1, leaders
    (leader,) = leaders
    assert (leader is None) == all(r.uplink_score < 50 for r in records)
    _, later = _run_rounds(mesh, edges, d + 2, now, delta)
    assert all(row == [leader] * n for row in later)


@settings(max_examples=100, deadline=None)
@given(_meshes())
def test_swim_a_dead_leader_is_replaced_everywhere_within_the_suspicion_timeout_and_2d(
    setup: tuple[list[MemberRecord], list[tuple[int, int]], list[set[int]]],
) -> None:
    """The failover bound with SWIM: after a neighbour's probe fails, every survivor follows one
    leader other than the dead one at most `suspicion_timeout + 2 D` later (rounds of 0.5 s)."""
    records, edges, _ = setup
    n = len(records)
    records = [replace(r, uplink_score=max(r.uplink_score, 60)) if i < 2 else r for i, r in enumerate(records)]
    mesh = [Membership(r, detector="swim", suspicion_timeout=5.0) for r in records]
    now, _ = _run_rounds(mesh, edges, 2 * _diameter(n, edges) + 2, 0.0, delta=True)
    leader = mesh[0].leader(now)
    assert leader is not None
    dead = int(leader[1:])
    survivors = [i for i in range(n) if i != dead]
    adj = [(u, v) for u, v in edges if dead not in (u, v)]
    if len(survivors) < 2 or _diameter_of(survivors, adj) is None:
        return  # the death cut the mesh in two: no bound to check across the halves
    d = _diameter_of(survivors, adj)
    assert d is not None
    for u, v in edges:
        if dead in (u, v):
            mesh[v if u == dead else u].suspect(leader, now)  # its neighbours' probes fail
    rounds = int(5.0 / 0.5) + 2 * d + 2
    alive = [mesh[i] for i in survivors]
    remap = {old: new for new, old in enumerate(survivors)}
    now, _ = _run_rounds(alive, [(remap[u], remap[v]) for u, v in adj], rounds, now, delta=True)
    leaders = {m.leader(now) for m in alive}
    assert len(leaders) == 1 and leader not in leaders, leaders


def _diameter_of(nodes: list[int], edges: list[tuple[int, int]]) -> int | None:
    """The diameter of the graph on `nodes`, or None if it is not connected."""
    adj: dict[int, set[int]] = {i: set() for i in nodes}
    for u, v in edges:
        adj[u].add(v)
        adj[v].add(u)
    worst = 0
    for s in nodes:
        dist = {s: 0}
        frontier = [s]
        while frontier:
            nxt = []
            for u in frontier:
                for v in adj[u]:
                    if v not in dist:
                        dist[v] = dist[u] + 1
                        nxt.append(v)
            frontier = nxt
        if len(dist) != len(nodes):
            return None
        worst = max(worst, max(dist.values()))
    return worst
