"""The replication core with plain `now` values: no trio, no network, no clock."""

from __future__ import annotations

import bisect
import random

import pytest
from automerge.core import ROOT, Document, ScalarType

from crdt import Replica
from meshnode.core import (
    Replicator,
    SendHello,
    SendPush,
    StartExchange,
    SyncDocs,
    Tick,
    build_push,
)
from meshnode.core.neighbours import Hellos

H1 = (b"\x01" * 32,)
H2 = (b"\x02" * 32,)


def engine(**kw: float) -> Replicator:
    """push_interval 0.3, and the default push budget (13.5 credits a change, up to 54)."""
    return Replicator("me", push_interval=0.3, exchange_interval=1.0, tick_interval=1.0, ttl=60.0, salt="t", **kw)


def pushes(actions: list) -> dict[str, tuple[str, ...]]:
    return {a.peer: a.docs for a in actions if isinstance(a, SendPush)}


def with_peers(*ids: str, now: float = 0.0, **kw: float) -> Replicator:
    e = engine(**kw)
    for nid in ids:
        e.hello_ok(nid, f"10.0.0.{len(e.table.peers) + 1}:5683", 1, now)
    e.poll(now)  # ticks and the first (urgent) exchanges
    for nid in ids:
        e.exchange_done(nid, now, in_sync=True)
    return e


def test_nothing_is_sent_to_an_address_before_a_verified_hello():
    e = engine()
    e.discovered("10.0.0.2:5683", 0.0)
    e.changed("doc", H1, 0.0)
    actions = e.poll(0.0)
    assert [a for a in actions if not isinstance(a, Tick)] == [SendHello("10.0.0.2:5683")]
    # The hello is in flight: no second one, and nothing else to do.
    assert [a for a in e.poll(0.1) if not isinstance(a, Tick)] == []
    e.hello_done("10.0.0.2:5683", True)
    e.hello_ok("b", "10.0.0.2:5683", 1, 0.2)
    actions = e.poll(0.2)
    assert StartExchange("b", "10.0.0.2:5683") in actions  # a new neighbour is checked at once,
    assert pushes(actions) == {"b": ("doc",)}  # gets what changed lately,
    e.changed("doc", H2, 0.6)
    assert pushes(e.poll(0.6)) == {"b": ("doc",)}  # and is a push target from its first hello


def test_only_settled_documents_are_left_to_anti_entropy():
    e = with_peers("b")
    e.changed("doc", H1, 10.0)
    assert not e.settled("doc", 10.5)
    assert e.settled("doc", 11.0)
    assert e.settled("never-changed-here", 0.0)


def test_with_fewer_neighbours_than_credits_every_change_goes_at_once_at_a_sustained_rate():
    # bench/mesh.py --sim: 9 neighbours, a change every ~80 ms from a random node;
    # the token bucket it replaces (two flushes, one per interval) made them wait.
    e = with_peers("b", "c")
    for k in range(20):
        t = 10.0 + 0.05 * k  # 20 a second: below the ceiling (flush_gap)
        e.changed(f"d{k}", H1, t)
        assert pushes(e.poll(t)) == {"b": (f"d{k}",), "c": (f"d{k}",)}
        assert e.credits == 52.0  # earns 13.5, spends 2, saves up to the cap (54)
    assert e.next_deadline() > 10.5  # nothing pending


def test_with_more_neighbours_than_credits_changes_batch_and_none_waits_past_the_interval():
    ids = [f"p{i:02}" for i in range(20)]
    e = with_peers(*ids, push_credits=15.0, push_credit_cap=30.0)
    assert e.credits == 30.0  # a full budget: two changes' worth here

    def flush(t: float) -> set[tuple[str, ...]]:
        out = pushes(e.poll(t))
        assert not out or sorted(out) == ids  # a flush goes to every neighbour at once
        return set(out.values())

    e.changed("d1", H1, 10.0)
    assert flush(10.0) == {("d1",)}  # 30 covers 20: at once (10 left)
    e.changed("d2", H1, 10.05)
    assert flush(10.05) == {("d2",)}  # 25 (5 left)
    e.changed("d3", H1, 10.1)
    assert flush(10.1) == {("d3",)}  # 20 (0 left)
    e.changed("d4", H1, 10.15)
    assert flush(10.15) == set()  # 15 < 20: waits for the next change or the timer
    assert e.next_deadline() == pytest.approx(10.45)
    e.changed("d5", H1, 10.2)
    assert flush(10.2) == {("d4", "d5")}  # 30: both in one flush (10 left)
    # A lone change the budget does not cover goes when it has waited push_interval,
    # and the budget runs into debt (invariant 2's timer flushes).
    e.changed("d6", H1, 11.0)
    assert flush(11.0) == {("d6",)}  # 25 (5 left)
    e.changed("d7", H1, 11.5)
    assert flush(11.5) == {("d7",)}  # 20 (0 left)
    e.changed("d8", H1, 12.0)
    assert flush(12.0) == set()
    assert e.next_deadline() <= 12.3
    assert flush(12.29) == set()
    assert flush(12.3) == {("d8",)}
    assert e.credits == -5.0
    e.changed("d9", H1, 12.31)
    assert flush(12.6) == set()  # the interval counts from this change on
    assert flush(12.62) == {("d9",)}
    assert e.credits == -10.0


def test_paid_flushes_have_a_ceiling_so_a_flood_of_changes_batches():
    e = with_peers("a", "b")
    sent: list[tuple[float, int]] = []
    t = 10.0
    for k in range(40):  # a change every 5 ms (a relay of a busy mesh), each paid for
        change_at = round(10.0 + 0.005 * k, 6)
        while (deadline := e.next_deadline()) is not None and deadline < change_at:  # flushes due between changes
            t = max(t, deadline)
            out = pushes(e.poll(t))
            if out:
                sent.append((t, len(out["a"])))
        t = change_at
        e.changed(f"d{k}", H1, t)
        out = pushes(e.poll(t))
        if out:
            assert sorted(out) == ["a", "b"] and out["a"] == out["b"]
            sent.append((t, len(out["a"])))
    # Four at once (flush_burst), each a change of its own; then one per flush_gap
    # (50 ms), each a batch of the changes made meanwhile.
    assert [n for _, n in sent[:4]] == [1, 1, 1, 1] and sent[3][0] == 10.015
    gaps = [b - a for (a, _), (b, _) in zip(sent[3:], sent[4:])]
    assert gaps and all(g == pytest.approx(0.05) for g in gaps[1:])
    assert all(n == 10 for _, n in sent[5:])
    assert len(sent) < 10


def test_a_change_that_only_others_carry_earns_nothing():
    e = with_peers("a", "b", push_credits=1.0, push_credit_cap=2.0)
    e.changed("d0", H1, 1.0)
    e.poll(1.0)
    before = e.credits
    e.told_targets("a", ["b", "me"])  # a pushes to b itself
    e.changed("doc", H1, 2.0, source="a")
    assert pushes(e.poll(2.0)) == {}
    assert e.credits == before and e.next_deadline() > 2.5


@pytest.mark.parametrize(
    "kw",
    [
        {"push_interval": 0.0},
        {"push_credits": 0.5},
        {"push_credits": 15.0, "push_credit_cap": 10.0},
        {"flush_gap": 0.0},
        {"flush_burst": 0},
    ],
)
def test_a_budget_that_never_pays_for_a_push_is_refused(kw):
    with pytest.raises(ValueError, match="push budget"):
        Replicator("me", **kw)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [{}, {"push_credits": 1.0, "push_credit_cap": 2.0}], ids=["default", "tight"])
def test_pushes_are_paid_for_and_the_deadline_holds_whatever_the_changes(seed, budget):
    """Invariants 2 and 4 over a random run: over any span, at most `2 * cap +
    C * push_credits + D * (1 + span / push_interval)` pushes; no change waits
    past push_interval; nothing due before `next_deadline()` and something due
    at it; nothing left pending at the end."""
    rng = random.Random(seed)
    ids = ["a", "b", "c"]
    e = with_peers(*ids, now=10.0, **budget)
    sent: list[float] = []
    changes: list[float] = []
    waiting: dict[tuple[str, str], float] = {}
    waits: list[float] = []

    def carry_out(actions: list, now: float) -> None:
        for a in actions:
            if isinstance(a, SendPush):
                sent.append(now)
                for d in a.docs:
                    waits.append(now - waiting.pop((a.peer, d)))
            elif isinstance(a, StartExchange):
                e.exchange_done(a.peer, now, in_sync=True)

    t = 10.0
    for step in range(600):
        deadline = e.next_deadline()
        assert deadline is not None
        later = round(t + rng.choice([0.0, 0.0, 0.01, 0.05, 0.1, 0.3, 0.9]), 6)
        if t < deadline <= later:
            t = deadline
            actions = e.poll(t)
            assert actions  # something is due at the deadline
            carry_out(actions, t)
            continue
        if deadline > later:
            assert e.poll(later) == []  # and nothing before it
        t = later
        for _ in range(rng.choice([0, 1, 1, 2])):
            heads = (step.to_bytes(2, "big") * 16,)
            doc = f"d{rng.randrange(6)}"
            e.changed(doc, heads, t, source=rng.choice([None, None, "a", "b"]))
            changes.append(t)
            for nid in ids:
                if doc in e.table.peers[nid].pending:
                    waiting.setdefault((nid, doc), t)
        carry_out(e.poll(t), t)
    while any(n.pending for n in e.table.peers.values()):
        t = max(t, e.next_deadline())
        carry_out(e.poll(t), t)
    assert not waiting and len(sent) > 60
    assert max(waits) <= e.push_interval + 1e-9
    cap, credits, interval = e.push_credit_cap, e.push_credits, e.push_interval
    for i, first in enumerate(sent):
        for j in range(i, len(sent)):
            span = sent[j] - first
            c = bisect.bisect_right(changes, sent[j]) - bisect.bisect_left(changes, first)
            assert j - i + 1 <= 2 * cap + c * credits + len(ids) * (1 + span / interval) + 1e-9
    flushes = sorted(set(sent))  # one flush per instant here (no catch-ups)
    for i, first in enumerate(flushes):
        for j in range(i, len(flushes)):
            span = flushes[j] - first
            assert j - i + 1 <= e.flush_burst + span / e.flush_gap + 1 + span / interval + 1e-9
    if budget:  # a budget short of the degree: changes batch, some wait for the timer
        assert any(w > 0 for w in waits)
    else:  # 3 neighbours, 13.5 credits a change: nothing waits past the ceiling's gap
        assert max(waits) <= e.flush_gap + 1e-9


def test_a_new_neighbour_gets_a_catch_up_push_at_once_even_when_the_budget_is_short():
    e = with_peers("a", "c", push_credits=1.0, push_credit_cap=1.0)
    e.changed("d0", H1, 10.0)
    assert pushes(e.poll(10.0)) == {}  # 1 credit, 2 pushes: waits for the timer (10.3)
    e.hello_ok("b", "10.0.0.9:5683", 1, 10.1)  # a node that just booted
    assert e.next_deadline() <= 10.1  # invariant 4: due now
    actions = e.poll(10.1)
    assert pushes(actions) == {"b": ("d0",)}  # at once, not at 10.3; a and c wait for the timer
    assert StartExchange("b", "10.0.0.9:5683") in actions
    assert e.next_deadline() == pytest.approx(10.3)
    assert pushes(e.poll(10.3)) == {"a": ("d0",), "c": ("d0",)}
    e.changed("d1", H2, 10.35)
    assert pushes(e.poll(10.35)) == {}
    assert pushes(e.poll(10.65)) == {"a": ("d1",), "b": ("d1",), "c": ("d1",)}  # then as everyone
    # Only once: a hello from a peer we know (same incarnation) is no catch-up.
    e.changed("d2", H1, 10.7)
    e.hello_ok("b", "10.0.0.9:5683", 1, 10.7)
    assert pushes(e.poll(10.7)) == {}
    # A restarted peer (new incarnation) is fresh again.
    e.hello_ok("a", "10.0.0.1:5683", 2, 10.8)
    assert pushes(e.poll(10.8)) == {"a": ("d0", "d1", "d2")}


def test_a_gap_left_by_a_lost_push_is_synced_with_that_peer_soon():
    e = with_peers("a", "b")
    e.changed("doc", H1, 10.0, source="a")
    e.poll(10.0)
    # The next push from a builds on a change that never arrived: sync doc with a
    # once gap_wait (0.2 s) has passed, not at the next exchange with a, nor with b.
    e.gap("a", "doc", H2, 10.0)
    e.gap("a", "new", H2, 10.0)  # one we do not hold yet: its first changes were lost
    e.gap("a", "archived", H2, 10.0)
    e.forget_doc("archived")  # left active gossip meanwhile: nothing to repair
    e.gap("a", "doc", H2, 10.1)  # a later push with the same gap does not restart the wait
    assert not [a for a in e.poll(10.1) if isinstance(a, SyncDocs)]  # it may only be late
    assert e.next_deadline() is not None and e.next_deadline() <= 10.2
    actions = e.poll(10.2)
    assert [a for a in actions if isinstance(a, SyncDocs)] == [SyncDocs("a", "10.0.0.1:5683", ("doc", "new"), (H2, H2))]
    assert not [a for a in actions if isinstance(a, StartExchange)]
    # One at a time per peer: gaps found meanwhile wait for the end of this one.
    e.changed("doc2", H1, 10.2, source="a")
    e.gap("a", "doc2", H1, 10.2)
    assert not [a for a in e.poll(10.5) if isinstance(a, SyncDocs)]
    e.repair_done("a", 10.5, ok=True)
    assert [a for a in e.poll(10.5) if isinstance(a, SyncDocs)] == [SyncDocs("a", "10.0.0.1:5683", ("doc2",), (H1,))]
    # A failed one backs the peer off like a failed exchange; a forgotten peer drops its gaps.
    e.repair_done("a", 10.6, ok=False)
    assert e.table.peers["a"].retry_at > 10.6
    e.gap("a", "doc", H2, 10.6)
    e.discovery_gone("a", None)
    assert not [a for a in e.poll(20.0) if isinstance(a, SyncDocs)]


def test_no_push_to_the_source_its_targets_or_a_peer_that_has_our_heads():
    e = with_peers("a", "b", "c", "d")
    e.told_targets("a", ["b", "me"])  # a pushes to b itself
    e.peer_has("d", "doc", H1)  # d already holds these heads
    e.changed("doc", H1, 5.0, source="a")
    assert pushes(e.poll(5.0)) == {"c": ("doc",)}
    # b may still lack it (status), but a covers it.
    assert "doc" in e.table.peers["b"].unsynced
    assert "doc" not in e.table.peers["a"].unsynced


def test_a_local_change_goes_to_every_neighbour_without_those_heads():
    e = with_peers("a", "b")
    e.peer_has("a", "doc", H1)
    e.changed("doc", H1, 1.0)
    assert pushes(e.poll(1.0)) == {"b": ("doc",)}
    e.pushed("b", "doc", H1)
    assert e.known_heads("b", "doc") == H1


def test_one_exchange_per_interval_oldest_first_and_backoff_after_failures():
    e = with_peers("a", "b")
    seen = []
    t = 1.0
    for _ in range(40):
        if len(seen) == 4:
            break
        deadline = e.next_deadline()
        assert deadline is not None
        t = max(t, deadline)
        for a in e.poll(t):
            if isinstance(a, StartExchange):
                seen.append(a.peer)
                e.exchange_done(a.peer, t, in_sync=True)
    assert seen == ["a", "b", "a", "b"]
    # A peer that fails is skipped while backed off, and forgotten after three failures.
    assert not e.exchange_failed("a", t)
    assert e.table.peers["a"].retry_at > t
    assert not e.exchange_failed("a", t)
    assert e.exchange_failed("a", t)
    assert "a" not in e.table.peers


def test_slow_answers_back_off_too():
    e = with_peers("a")
    e.exchange_done("a", 3.0, in_sync=True, slow=True)
    assert e.table.peers["a"].retry_at > 3.0


def test_a_slow_but_live_peer_is_backed_off_not_forgotten():
    # N3: late answers are answers. Counted as failures, three of them and one
    # lost exchange forgot a loaded peer like a dead one (field suite).
    e = with_peers("a")
    t = 3.0
    for _ in range(5):
        e.exchange_done("a", t, in_sync=True, slow=True)
        assert e.table.peers["a"].retry_at > t
        t += 10.0
    assert e.table.peers["a"].retry_at - (t - 10.0) <= 8.0  # slow backoff has its own, lower cap
    assert not e.exchange_failed("a", t)
    assert not e.exchange_failed("a", t + 1)
    assert "a" in e.table.peers
    # A slow answer ends a run of failures; failures in a row still forget it.
    e.exchange_done("a", t + 2, in_sync=True, slow=True)
    assert not e.exchange_failed("a", t + 3)
    assert not e.exchange_failed("a", t + 4)
    assert e.exchange_failed("a", t + 5)
    assert "a" not in e.table.peers


def test_silent_peers_are_forgotten_after_the_ttl_once_an_exchange_since_has_failed():
    e = with_peers("a", now=0.0)
    e.heard("a", 30.0)
    assert StartExchange("a", "10.0.0.1:5683") in e.poll(89.0)
    e.poll(90.0)
    assert "a" in e.table.peers  # silent for the TTL, but our question is in flight (N2)
    assert not e.exchange_failed("a", 91.0)
    assert e.table.next_expiry() == 90.0
    e.poll(91.0)
    assert "a" not in e.table.peers


def test_a_live_neighbour_is_not_forgotten_while_it_waits_for_its_turn():
    """N2: ten neighbours at the 8 s idle interval are each asked every ~80 s; silence
    until our turn is not evidence (before, half of such pairs were forgotten each cycle)."""
    ids = [f"p{i}" for i in range(10)]
    e = with_peers(*ids, now=0.0)
    e.exchange_interval = 8.0
    now = 0.0
    while now < 600.0:
        now += 0.5
        for action in e.poll(now):
            if isinstance(action, StartExchange):
                e.exchange_done(action.peer, now + 0.05, in_sync=True)
        assert sorted(e.table.peers) == ids, now


def test_one_lost_idle_exchange_does_not_forget_a_live_neighbour_but_a_dead_one_goes():
    """N2: ten neighbours at the 8 s idle interval are asked every 64-96 s; with the
    60 s TTL a single lost exchange then forgot a live one (greeted again in the
    idle simulated mesh). The TTL is three rounds here (240 s); a dead neighbour is
    still forgotten, by its failures in a row."""
    ids = [f"p{i}" for i in range(10)]
    e = with_peers(*ids, now=0.0)
    e.exchange_interval = 8.0
    asked = {nid: 0 for nid in ids}
    now = 0.0
    while now < 900.0:
        now += 0.5
        for action in e.poll(now):
            if isinstance(action, StartExchange):
                asked[action.peer] += 1
                if (action.peer == "p3" and asked["p3"] == 2) or (action.peer == "p7" and now > 300.0):
                    e.exchange_failed(action.peer, now + 3.0)  # p3: one lost message; p7: gone
                else:
                    e.exchange_done(action.peer, now + 0.05, in_sync=True)
        if now < 300.0:
            assert sorted(e.table.peers) == ids, now
    assert "p3" in e.table.peers and asked["p3"] > 3
    assert "p7" not in e.table.peers


def test_a_restarted_peer_loses_what_we_believed_it_holds():
    e = with_peers("a")
    e.peer_has("a", "doc", H1)
    e.hello_ok("a", "10.0.0.1:5683", 2, 5.0)
    assert e.known_heads("a", "doc") == ()
    assert StartExchange("a", "10.0.0.1:5683") in e.poll(5.0)


def test_unverified_senders_leave_only_a_bounded_expiring_trace():
    h = Hellos(max_unverified=4, unverified_ttl=10.0)
    for i in range(100):
        h.suggest(f"10.0.1.{i}:5683", 0.0)
    assert len(h.unverified) == 4
    assert h.due(0.0, set()) == [f"10.0.1.{i}:5683" for i in range(4)]
    for i in range(4):
        h.done(f"10.0.1.{i}:5683", False)
    assert not h.unverified and not h.in_flight  # greeted once, then gone
    h.suggest("10.0.2.1:5683", 1.0)
    h.in_flight.add("10.0.2.1:5683")  # (as if greeted by another path)
    assert h.due(20.0, set()) == [] and not h.unverified  # expired


def test_next_deadline_is_when_poll_has_work():
    e = with_peers("a", "b")
    e.changed("doc", H1, 2.0)
    t = 2.0
    for _ in range(20):
        deadline = e.next_deadline()
        assert deadline is not None
        if deadline > t:
            # Nothing is due before the deadline ...
            assert [a for a in e.poll((t + deadline) / 2)] == []
        t = max(t, deadline)
        actions = e.poll(t)
        assert actions  # ... and something is due at it.
        for a in actions:
            if isinstance(a, StartExchange):
                e.exchange_done(a.peer, t, in_sync=True)


def _doc(n: int) -> Document:
    doc = Document()
    for i in range(n):
        with doc.transaction() as tx:
            tx.put(ROOT, f"k{i}", ScalarType.Bytes, bytes(200))
    return doc


def test_build_push_sends_only_what_the_peer_lacks_within_the_byte_cap():
    r = Replica({"a": _doc(3), "b": _doc(3), "c": _doc(3)})
    old = tuple(sorted(r.docs["a"].get_changes([])[1].hash for _ in range(1)))
    known = {"a": old, "b": tuple(sorted(r.docs["b"].get_heads()))}
    entries, left = build_push(r, ["a", "b", "c"], lambda d: known.get(d, ()), byte_cap=10)
    assert list(entries) == ["a"] and left == ["c"]  # b has it all; c waits for the cap
    heads, msg = entries["a"]
    assert heads == tuple(sorted(r.docs["a"].get_heads()))
    # The message applies on a copy that holds the known heads.
    peer = Replica()
    peer.receive("x", "a", build_push(r, ["a"], lambda d: (), 1 << 20)[0]["a"][1])
    assert peer.docs["a"].get_heads() == r.docs["a"].get_heads()
    assert len(msg) < len(build_push(r, ["a"], lambda d: (), 1 << 20)[0]["a"][1])


def test_a_shorter_pace_pulls_in_the_exchange_scheduled_at_the_idle_one():
    """N5: news that makes a node busy goes out within the busy period, not after the idle
    exchange already scheduled (the uplink leader's failover waited for it)."""
    e = with_peers("a", "b")
    assert not e.set_pace(8.0, 0.0)  # quiet: a longer period moves nothing already scheduled
    t = 0.0
    for _ in range(4):  # the exchange and the tick scheduled at the busy period fire once more
        deadline = e.next_deadline()
        assert deadline is not None
        if deadline >= t + 8.0 * 0.8 - 1.2:
            break
        t = deadline
        for a in e.poll(t):
            if isinstance(a, StartExchange):
                e.exchange_done(a.peer, t, in_sync=True)
    idle_next = e.next_deadline()
    assert idle_next is not None and idle_next >= t + 8.0 * 0.8 - 1.2  # now at the idle period
    assert e.set_pace(1.0, t + 0.5)  # busy: a suspicion to spread
    busy_next = e.next_deadline()
    assert busy_next is not None and busy_next <= t + 0.5 + 1.0 * 1.2
    assert any(isinstance(a, StartExchange) for a in e.poll(t + 0.5 + 1.2))  # long before t + 6.4
    assert not e.set_pace(1.0, t + 1.7)  # the same pace again pulls nothing in
