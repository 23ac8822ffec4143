"""Tests of R12 (``meshnode/_membership.py``): the SWIM detector's reachability over reported links.

A SWIM node probes only its direct neighbours, so in a multi-hop mesh cut in two, a node none
of whose neighbours is on our side was never suspected here and stayed ALIVE (with its claim to
lead) for ever. With R12 every record lists its node's links; a member that no path of links
reported by both ends reaches from us is SUSPECT at once and DEAD ``suspicion_timeout`` later,
and ALIVE again as soon as a path returns. Time is virtual and passed in; rounds of 0.5 s as in
tests/test_membership.py, whose helpers these tests share.
"""

from __future__ import annotations

import random
from dataclasses import replace

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode._membership import (
    MAX_NEIGHBOURS,
    NEIGHBOUR_HASH_LEN,
    MemberRecord,
    Membership,
    MembershipError,
    PeerState,
    neighbour_hash,
)
from tests.test_membership import EPS, _diameter_of, _meshes, _run_rounds, rec

ST = 5.0  # suspicion_timeout of these meshes: 10 rounds


def links(*peers: str) -> bytes:
    return b"".join(sorted(neighbour_hash(p) for p in peers))


def node(node_id: str, score: int = 0, **kwargs: float) -> Membership:
    return Membership(rec(node_id, 1, 0, score), detector="swim", **kwargs)  # type: ignore[arg-type]


def line(n: int, scores: dict[int, int]) -> tuple[list[Membership], list[tuple[int, int]]]:
    """n0 - n1 - ... - n(n-1), each told its neighbours, run until every view is complete."""
    mesh = [node(f"n{i}", scores.get(i, 0), suspicion_timeout=ST) for i in range(n)]
    edges = [(i, i + 1) for i in range(n - 1)]
    tell(mesh, edges)
    return mesh, edges


def tell(mesh: list[Membership], edges: list[tuple[int, int]]) -> None:
    for i, m in enumerate(mesh):
        m.set_neighbours({mesh[v if u == i else u].node_id for u, v in edges if i in (u, v)})


# --- records on the wire --------------------------------------------------------------------


def test_links_round_trip_and_are_absent_on_the_wire_when_there_are_none() -> None:
    record = replace(rec("a", 1, 2, 70), neighbours=links("b", "c"))
    obj = record.to_wire()
    assert obj["nb"] == links("b", "c") and len(obj["nb"]) == 2 * NEIGHBOUR_HASH_LEN
    assert MemberRecord.from_wire(cbor2.loads(cbor2.dumps(obj))) == record
    assert "nb" not in rec("a").to_wire()
    assert record.neighbour_set() == {neighbour_hash("b"), neighbour_hash("c")}


@pytest.mark.parametrize(
    "bad",
    [b"1234567", "12345678", [b"12345678"], b"x" * NEIGHBOUR_HASH_LEN * (MAX_NEIGHBOURS + 1)],
)
def test_bad_links_on_the_wire_are_refused(bad: object) -> None:
    obj = rec("a", 1, 2).to_wire()
    obj["nb"] = bad
    with pytest.raises(MembershipError, match="neighbours"):
        MemberRecord.from_wire(obj)


# --- our own links ------------------------------------------------------------------------------


def test_set_neighbours_publishes_the_links_once_and_the_heartbeat_detector_ignores_them() -> None:
    m = node("self")
    before = m.self_record
    after = m.set_neighbours(["b", "a", "self"])
    assert after.neighbours == links("a", "b") and after.key > before.key  # a change spreads (R6)
    assert m.set_neighbours(iter(["a", "b"])) is after  # the same set: nothing moves
    assert m.set_neighbours([]).neighbours == b""
    hb = Membership(rec("self", 1), detector="heartbeat")
    assert hb.set_neighbours(["a"]) == rec("self", 1)


def test_a_node_with_too_many_neighbours_lists_the_links_both_ends_choose() -> None:
    ids = [f"p{i:03d}" for i in range(MAX_NEIGHBOURS + 40)]
    m = node("self")
    listed = m.set_neighbours(ids).neighbour_set()
    assert len(listed) == MAX_NEIGHBOURS
    for peer in ids[:60]:  # a neighbour with the same many peers keeps the link iff we do
        other = node(peer)
        theirs = other.set_neighbours([p for p in ids if p != peer] + ["self"]).neighbour_set()
        assert (neighbour_hash(peer) in listed) == (neighbour_hash("self") in theirs)


# --- the regression: a far node behind a cut ----------------------------------------------------


def test_a_leader_behind_a_multi_hop_cut_is_dead_on_our_side_and_we_elect_our_own() -> None:
    """n0 - n1 | n2 - n3: n3 leads (score 90), n0 can (60). The n1-n2 link fails: n1's probes
    of n2 fail, so n1 suspects n2 and drops the link. n3 is nobody's neighbour on n0's side;
    before R12 it stayed ALIVE there and n0, n1 kept following it across the cut."""
    mesh, edges = line(4, {0: 60, 3: 90})
    now, _ = _run_rounds(mesh, edges, 12, 0.0, delta=True)
    assert {m.leader(now) for m in mesh} == {"n3"}
    assert all(m.state("n3", now) is PeerState.ALIVE for m in mesh)
    # The cut, as the node sees it: three failed probes, the neighbour forgotten and suspected.
    mesh[1].set_neighbours(["n0"])
    mesh[1].suspect("n2", now)
    mesh[2].set_neighbours(["n3"])
    mesh[2].suspect("n1", now)
    cut = [(0, 1), (2, 3)]
    now, _ = _run_rounds(mesh, cut, int(ST / 0.5) + 2 * 1 + 2, now, delta=True)
    assert [m.leader(now) for m in mesh] == ["n0", "n0", "n3", "n3"]
    for side, other in (((0, 1), ("n2", "n3")), ((2, 3), ("n0", "n1"))):
        for i in side:
            assert [mesh[i].state(p, now) for p in other] == [PeerState.DEAD, PeerState.DEAD], (i, other)


def test_unreachable_is_suspect_at_once_dead_exactly_a_suspicion_timeout_later_and_never_a_death_notice() -> None:
    m = node("self", suspicion_timeout=10.0, forget_after=300.0)
    m.set_neighbours(["a"])
    m.merge(
        [
            replace(rec("a", 1, 1), neighbours=links("self", "b")),
            replace(rec("b", 1, 1, 90, leader="b"), neighbours=links("a")),
        ],
        0.0,
    )
    assert m.state("b", 0.0) is PeerState.ALIVE and m.leader(0.0) == "b"
    m.merge([replace(rec("a", 1, 2), neighbours=links("self"))], 100.0)  # a lost b
    assert m.state("b", 100.0) is PeerState.SUSPECT and m.leader(100.0) == "b"  # SUSPECT still votes (R7)
    assert m.next_deadline() == 110.0
    assert m.state("b", 110.0 - EPS) is PeerState.SUSPECT
    assert m.state("b", 110.0) is PeerState.DEAD and m.leader(110.0) is None
    # Our own inference, not a death notice: neither gossiped nor queued, and the record stands.
    assert [r.node_id for r in m.records_for_gossip(110.0)] == ["a", "self"]
    while m.pending_updates():
        assert "b" not in {r.node_id for r in m.piggyback(111.0, 8)}
    assert [r.node_id for r in m.piggyback(111.0, 32, repair=True)] == ["self", "a"]
    # The link comes back (the heal): ALIVE at once, no refutation needed.
    m.merge([replace(rec("a", 1, 3), neighbours=links("self", "b"))], 150.0)
    assert m.state("b", 150.0) is PeerState.ALIVE and m.leader(150.0) == "b"
    # Lost again for good: DEAD, then dropped outright (no tombstone) forget_after later.
    m.merge([replace(rec("a", 1, 4), neighbours=links("self"))], 200.0)
    assert m.next_deadline() == 210.0
    assert m.state("b", 510.0 - EPS) is PeerState.DEAD
    assert [v.record.node_id for v in m.view(510.0)] == ["a", "self"] and m.next_deadline() is None
    m.merge([replace(rec("b", 1, 1), neighbours=links("a"))], 520.0)  # its record again: a new member
    assert m.state("b", 520.0) is PeerState.SUSPECT


def test_a_link_counts_only_when_both_ends_list_it_and_a_suspected_node_relays_nothing() -> None:
    m = node("self", suspicion_timeout=10.0)
    m.set_neighbours(["a"])
    a = replace(rec("a", 1, 1), neighbours=links("self", "b"))
    m.merge([a, replace(rec("b", 1, 1), neighbours=links("c")), replace(rec("c", 1, 1), neighbours=links("b"))], 0.0)
    assert [m.state(p, 0.0) for p in "abc"] == [PeerState.ALIVE, PeerState.SUSPECT, PeerState.SUSPECT]
    m.merge([replace(rec("b", 1, 2), neighbours=links("a", "c"))], 1.0)  # b's end of the link arrives
    assert [m.state(p, 1.0) for p in "abc"] == [PeerState.ALIVE] * 3
    assert m.suspect("a", 2.0)  # our probes of a failed: what lies behind it is unreachable too
    assert [m.state(p, 2.0) for p in "abc"] == [PeerState.SUSPECT] * 3
    m.merge([replace(a, incarnation=2)], 3.0)  # a refutes
    assert [m.state(p, 3.0) for p in "abc"] == [PeerState.ALIVE] * 3
    assert [m.state(p, 20.0) for p in "abc"] == [PeerState.ALIVE] * 3


def test_without_set_neighbours_reachability_is_off() -> None:
    """A caller that reports no links (a full mesh in a test) keeps R11 alone."""
    m = node("self")
    m.merge([rec("far", 1, 1, 90, leader="far")], 0.0)
    assert m.state("far", 1_000.0) is PeerState.ALIVE and m.leader(1_000.0) == "far"


# --- properties -----------------------------------------------------------------------------------


@st.composite
def _cuts(draw: st.DrawFn) -> tuple[list[MemberRecord], list[tuple[int, int]], set[int], bool]:
    records, edges, _ = draw(_meshes())
    n = len(records)
    side = {0} | draw(st.sets(st.integers(1, n - 1), max_size=n - 2))
    return records, edges, side, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(_cuts())
def test_after_a_cut_each_side_elects_its_own_leader_within_the_bound(
    setup: tuple[list[MemberRecord], list[tuple[int, int]], set[int], bool],
) -> None:
    """A random connected mesh agrees on a leader; then a random cut separates two connected
    sides (the nodes at the cut drop their links, and suspect the node across it or not). Each
    side holds every node of the other DEAD and follows one leader of its own side (or none if
    none can lead) at most `suspicion_timeout + 2 D` later: ST / 0.5 + 2 d + 2 rounds."""
    records, edges, side, suspect = setup
    n = len(records)
    other = set(range(n)) - side
    inner = [(u, v) for u, v in edges if (u in side) == (v in side)]
    d_side = _diameter_of(sorted(side), [(u, v) for u, v in inner if u in side])
    d_other = _diameter_of(sorted(other), [(u, v) for u, v in inner if u in other])
    if d_side is None or d_other is None:
        return  # a side is not connected on its own: not this property
    mesh = [Membership(r, detector="swim", suspicion_timeout=ST) for r in records]
    tell(mesh, edges)
    now, _ = _run_rounds(mesh, edges, 2 * (_diameter_of(list(range(n)), edges) or 0) + 2, 0.0, delta=True)
    assert len({m.leader(now) for m in mesh}) == 1
    tell(mesh, inner)
    if suspect:
        for u, v in edges:
            if (u in side) != (v in side):
                mesh[u].suspect(mesh[v].node_id, now)
                mesh[v].suspect(mesh[u].node_id, now)
    now, _ = _run_rounds(mesh, inner, int(ST / 0.5) + 2 * max(d_side, d_other) + 2, now, delta=True)
    for group, far in ((side, other), (other, side)):
        leaders = {mesh[i].leader(now) for i in group}
        assert len(leaders) == 1, (group, leaders)
        (leader,) = leaders
        assert leader is None or int(leader[1:]) in group, (group, leader)
        for i in group:
            assert all(mesh[i].state(f"n{j}", now) is PeerState.DEAD for j in far), (i, mesh[i].view(now))


_linked = st.builds(
    lambda r, nb: replace(r, neighbours=links(*nb)),
    st.builds(
        MemberRecord,
        st.sampled_from(["a", "b", "c", "self"]),
        st.integers(0, 3),
        st.integers(0, 4),
        st.integers(0, 100),
        st.just("10.0.0.1:5683"),
        st.just("0.1.0"),
        st.sampled_from([None, "a", "b"]),
        st.integers(0, 2),
    ),
    st.sets(st.sampled_from(["a", "b", "c", "self"])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_linked, max_size=20), st.randoms(use_true_random=False))
def test_merge_order_does_not_matter_with_links(records: list[MemberRecord], rnd: random.Random) -> None:
    """Invariant 3 with R12 on: the table and the verdicts after one `now` do not depend on order."""
    a, b = node("self"), node("self")
    a.set_neighbours(["a"])
    b.set_neighbours(["a"])
    a.merge(records, 1.0)
    shuffled = list(records) * 2
    rnd.shuffle(shuffled)
    for r in shuffled:
        b.merge([r], 1.0)
    for t in (1.0, 30.0):
        assert [(v.record, v.state) for v in a.view(t)] == [(v.record, v.state) for v in b.view(t)]
        assert a.digest(t) == b.digest(t) and a.leader(t) == b.leader(t)


# --- the incremental reachability against the full recomputation ---------------------------------


class FullReach(Membership):
    """The reference: reachability walked from scratch over the records at every recomputation
    (what `_reach` did before it kept its links and tree up to date)."""

    def _reach(self, now: float) -> None:
        self._reach_dirty = False
        if self._direct is not None:
            self._set_reached(self._reachable(), list(self._peers), now)


PEERS = [f"p{i}" for i in range(8)]


def _apply(ms: list[Membership], op: tuple, clock: list[float], lives: dict[str, list[int]]) -> None:
    """One change, made the same way to every membership in `ms`. `lives[peer]` is
    [incarnation, heartbeat] of the peer's latest record, so each record it sends is newer."""
    kind = op[0]
    if kind == "wait":
        clock[0] += op[1]
        return
    now = clock[0]
    if kind == "direct":
        for m in ms:
            m.set_neighbours(op[1])
    elif kind == "suspect":
        for m in ms:
            m.suspect(op[1], now)
    elif kind == "observe":
        for m in ms:
            m.observe_direct(op[1], now)
    else:  # "links", "status" or "refute": a record from (or about) a peer
        peer, nb, status = op[1], op[2], op[3] if kind == "status" else 0
        life = lives.setdefault(peer, [1, 0])
        if kind == "refute":
            life[0] += 1
        life[1] += 1
        record = MemberRecord(peer, life[0], life[1], 0, "10.0.0.1:5683", "4", None, status, links(*nb))
        for m in ms:
            m.merge([record], now)


def _check_same(inc: Membership, full: Membership, now: float) -> None:
    view = [(v.record, v.state, v.age) for v in inc.view(now)]
    assert view == [(v.record, v.state, v.age) for v in full.view(now)]
    assert inc.next_deadline() == full.next_deadline()
    assert inc.digest(now) == full.digest(now) and inc.leader(now) == full.leader(now)
    assert {p: e.unreachable_since for p, e in inc._peers.items()} == {
        p: e.unreachable_since for p, e in full._peers.items()
    }
    if inc._direct is not None:
        # The tree's answer is the walk's: every member we hold reachable has a path, and back.
        reached = inc._reachable()
        assert set(inc._parent) == reached  # the tree holds what the walk reaches, nothing else
        for node_id, entry in inc._peers.items():
            if entry.state is not None:
                assert (entry.unreachable_since is None) == (node_id in reached), node_id
                assert (node_id in inc._parent) == (node_id in reached), node_id


_nb = st.sets(st.sampled_from([*PEERS, "self"]), max_size=5)
_reach_ops = st.lists(
    st.one_of(
        st.tuples(st.just("links"), st.sampled_from(PEERS), _nb),
        st.tuples(st.just("links"), st.sampled_from(PEERS), _nb),
        st.tuples(st.just("status"), st.sampled_from(PEERS), _nb, st.integers(1, 2)),
        st.tuples(st.just("refute"), st.sampled_from(PEERS), _nb),
        st.tuples(st.just("suspect"), st.sampled_from(PEERS)),
        st.tuples(st.just("direct"), st.sets(st.sampled_from(PEERS), max_size=3)),
        st.tuples(st.just("observe"), st.sampled_from(PEERS)),
        st.tuples(st.just("wait"), st.sampled_from([0.0, 1.0, 5.0, 10.0, 300.0, 310.0, 700.0])),
    ),
    max_size=60,
)


@settings(max_examples=600, deadline=None)
@given(_reach_ops)
def test_incremental_reachability_equals_the_full_recomputation_after_any_changes(ops: list[tuple]) -> None:
    """R12, R10: links that come and go, members suspected, dead, refuted, forgotten and dropped,
    direct neighbours that change, time that passes: after every change the incremental answer
    (verdicts, deadlines, clocks, the digest, the leader) is the full walk's."""
    inc = Membership(rec("self", 1), detector="swim", suspicion_timeout=10.0, forget_after=300.0)
    full = FullReach(rec("self", 1), detector="swim", suspicion_timeout=10.0, forget_after=300.0)
    clock, lives = [0.0], {}
    for op in ops:
        _apply([inc, full], op, clock, lives)
        _check_same(inc, full, clock[0])


def test_incremental_reachability_equals_the_full_recomputation_in_a_large_flapping_mesh() -> None:
    """The same at the scale where the tree is deep: 150 members in a random geometric mesh
    (about eight neighbours each), whose links fail and return, members suspected and refuted,
    our own neighbours changing, for 1,500 changes."""
    rnd = random.Random(12)
    ids = ["self", *(f"m{i:03d}" for i in range(150))]
    pos = {n: (rnd.random(), rnd.random()) for n in ids}
    adj: dict[str, set[str]] = {n: set() for n in ids}
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            if (pos[a][0] - pos[b][0]) ** 2 + (pos[a][1] - pos[b][1]) ** 2 < 0.13**2:
                adj[a].add(b)
                adj[b].add(a)
    inc = Membership(rec("self", 1), detector="swim", suspicion_timeout=10.0, forget_after=300.0)
    full = FullReach(rec("self", 1), detector="swim", suspicion_timeout=10.0, forget_after=300.0)
    clock, lives = [0.0], {}
    _apply([inc, full], ("direct", adj["self"]), clock, lives)
    for peer in ids[1:]:
        _apply([inc, full], ("links", peer, adj[peer]), clock, lives)
    _check_same(inc, full, clock[0])
    down: set[tuple[str, str]] = set()
    for step in range(1500):
        roll = rnd.random()
        if roll < 0.5:  # a link fails or comes back; one end (or both) says so
            a = rnd.choice(ids[1:])
            if not adj[a]:
                continue
            b = rnd.choice(sorted(adj[a]))
            key = (min(a, b), max(a, b))
            down ^= {key}
            for end in (a, b) if rnd.random() < 0.7 else (a,):
                if end != "self":
                    up = {p for p in adj[end] if (min(end, p), max(end, p)) not in down}
                    _apply([inc, full], ("links", end, up), clock, lives)
        elif roll < 0.6:
            _apply([inc, full], ("suspect", rnd.choice(ids[1:])), clock, lives)
        elif roll < 0.7:
            peer = rnd.choice(ids[1:])
            up = {p for p in adj[peer] if (min(peer, p), max(peer, p)) not in down}
            _apply([inc, full], ("refute", peer, up), clock, lives)
        elif roll < 0.75:
            mine = {p for p in adj["self"] if (min("self", p), max("self", p)) not in down}
            _apply([inc, full], ("direct", mine), clock, lives)
        else:
            _apply([inc, full], ("wait", rnd.choice([0.5, 2.0, 11.0])), clock, lives)
        if step % 10 == 0 or step > 1400:
            _check_same(inc, full, clock[0])
    assert 0 < len(inc._parent) < 150  # the run reached a mixed state, neither empty nor whole
