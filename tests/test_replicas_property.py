"""Property: replicas that each saw some of the events converge on all of them.

Signed events (forks, backwards meters and illegal transitions included) are
each added at one replica, sometimes at a second one too (an event that reached
two nodes), in a random order with duplicates; no replica adds the others'
events. Between additions, random pairs exchange Automerge sync messages, some
of which are dropped and delivered again later. Once they have synced they must
hold identical heads and an identical folded state, conflicts included, and that
state must account for every event added anywhere: an event reaches the other
replicas only through sync, so one that sync loses is missed.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt import EVENT_TYPES, Keyring, Replica, add_event, fold_session, new_session_doc

from .conftest import make_signer

DEVICES = ("charger-1", "charger-2")
KEYRING = Keyring({d: make_signer(d).public_key for d in DEVICES})


@st.composite
def scenarios(draw):
    n_sessions = draw(st.integers(1, 3))
    signers = {d: make_signer(d) for d in DEVICES}
    events = []
    for s in range(n_sessions):
        meter = 0
        for _ in range(draw(st.integers(1, 8))):
            device = draw(st.sampled_from(DEVICES))
            kind = draw(st.sampled_from(EVENT_TYPES))
            meter += draw(st.integers(-50, 500))  # sometimes backwards
            ts = draw(st.integers(0, 20))
            signer = signers[device]
            if draw(st.integers(0, 9)) == 0:  # fork: sign another event at the same seq
                twin = make_signer(device)
                twin.seq, twin.prev = signer.seq, signer.prev
                events.append((s, twin.sign(kind, f"s{s}", ts, meter_wh=max(meter, 0) + 1)))
            events.append((s, signer.sign(kind, f"s{s}", ts, meter_wh=max(meter, 0))))
    owners = [draw(st.integers(0, 2)) for _ in range(n_sessions)]
    # Who adds each event: its origin, and sometimes a second replica that received it too.
    held: list[list[tuple[int, object]]] = [[], [], []]
    for item in events:
        origin = draw(st.integers(0, 2))
        held[origin].append(item)
        second = draw(st.integers(0, 5))
        if second < 3 and second != origin:
            held[second].append(item)
    orders = [
        draw(st.permutations(mine + (draw(st.lists(st.sampled_from(mine), max_size=3)) if mine else [])))
        for mine in held
    ]
    steps = draw(
        st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, 2), st.sampled_from(["deliver", "drop", "resend"])),
            max_size=30,
        )
    )
    return n_sessions, owners, orders, steps, events


def sync_pair(a: Replica, b: Replica, an: str, bn: str, doc_id: str) -> bool:
    moved = False
    for src, dst, sname, dname in ((a, b, an, bn), (b, a, bn, an)):
        msg = src.generate(dname, doc_id)
        if msg is not None:
            dst.receive(sname, doc_id, msg)
            moved = True
    return moved


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_three_replicas_converge(scenario):
    n_sessions, owners, orders, steps, events = scenario
    replicas = [Replica() for _ in range(3)]
    names = ["r0", "r1", "r2"]
    doc_ids = [f"s{s}" for s in range(n_sessions)]
    for s, owner in enumerate(owners):
        replicas[owner].add(
            doc_ids[s],
            new_session_doc(
                doc_ids[s], site="x", charger="c", connector=1, id_token="t", tariff={}, created_by=names[owner]
            ),
        )
    # Everyone gets every document through sync before adding events (only the owner creates).
    for doc_id in doc_ids:
        for _ in range(4):
            for i in range(3):
                for j in range(3):
                    if i != j:
                        sync_pair(replicas[i], replicas[j], names[i], names[j], doc_id)

    dropped: list[tuple[int, int, str, bytes]] = []
    step_iter = iter(steps)
    for position in range(max(len(o) for o in orders) + len(steps)):
        for r, order in enumerate(orders):
            if position < len(order):
                s, event = order[position]
                add_event(replicas[r].docs[doc_ids[s]], event)
        step = next(step_iter, None)
        if step is None:
            continue
        i, j, action = step
        if i == j:
            continue
        for doc_id in doc_ids:
            if action == "resend" and dropped:
                si, sj, d, msg = dropped.pop(0)
                replicas[sj].receive(names[si], d, msg)
            msg = replicas[i].generate(names[j], doc_id)
            if msg is None:
                continue
            if action == "drop":
                dropped.append((i, j, doc_id, msg))
            else:
                replicas[j].receive(names[i], doc_id, msg)

    for si, sj, d, msg in dropped:  # every dropped message is re-sent eventually
        replicas[sj].receive(names[si], d, msg)
    for doc_id in doc_ids:
        for _ in range(50):
            moved = False
            for i in range(3):
                for j in range(3):
                    if i < j:
                        moved |= sync_pair(replicas[i], replicas[j], names[i], names[j], doc_id)
            if not moved:
                break
        assert not moved, "sync did not quiesce"

        heads = [sorted(r.docs[doc_id].get_heads()) for r in replicas]
        assert heads[0] == heads[1] == heads[2]
        views = [fold_session(r.docs[doc_id], KEYRING)[1] for r in replicas]
        assert views[0] == views[1] == views[2]
        # And the folded state reflects every event of the session added at any replica, none lost.
        added = {e.event_id for s, e in events if doc_ids[s] == doc_id}
        assert added == {e.event_id for order in orders for s, e in order if doc_ids[s] == doc_id}
        assert set(views[0].event_ids) | {c.event_id for c in views[0].conflicts} == added
