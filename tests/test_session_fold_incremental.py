"""The incremental fold (`SessionFold`) and the process's signature cache (`EventCache`).

The claim: `SessionFold.update` gives exactly what a fresh `fold` gives, whatever
arrives (forks, late events, broken links, bad signatures, events of another
session, removed or rewritten entries, new keys), and an old event's signature is
never checked twice.
"""

from __future__ import annotations

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt import EVENT_TYPES, EventCache, Keyring, SessionFold, fold

from .conftest import make_signer

DEVICES = ("charger-1", "charger-2")
KEYRING = Keyring({d: make_signer(d).public_key for d in DEVICES})


def _forged(blob: bytes) -> bytes:
    body = cbor2.loads(blob)
    body["sig"] = bytes(64)
    return cbor2.dumps(body, canonical=True)


@st.composite
def histories(draw):
    """A sequence of versions of one session's `events` map."""
    signers = {d: make_signer(d) for d in DEVICES}
    pool: list[tuple[str, bytes]] = []
    meter = 0
    ts = 0
    for _ in range(draw(st.integers(1, 14))):
        device = draw(st.sampled_from(DEVICES))
        kind = draw(st.sampled_from(("meter", "meter", "meter", *EVENT_TYPES)))
        meter += draw(st.integers(-20, 300))
        ts += draw(st.integers(-3, 10))  # now and then an event from the past
        session = "s" if draw(st.integers(0, 14)) else "other"
        signer = signers[device]
        roll = draw(st.integers(0, 19))
        if roll == 0:  # a fork at the signer's next seq
            twin = make_signer(device)
            twin.seq, twin.prev = signer.seq, signer.prev
            e = twin.sign(kind, session, ts, meter_wh=max(meter, 0) + 1)
            pool.append((e.event_id, e.encoded))
        elif roll == 1:  # a gap in the chain: a later link points at nothing here
            signer.sign("meter", session, ts, meter_wh=max(meter, 0))
        e = signer.sign(kind, session, ts, meter_wh=max(meter, 0))
        pool.append((e.event_id, _forged(e.encoded) if roll == 2 else e.encoded))
    # Versions: the usual case adds one event at a time; now and then several at once,
    # in another order, or an entry disappears or is rewritten.
    order = draw(st.permutations(range(len(pool)))) if draw(st.booleans()) else list(range(len(pool)))
    versions = []
    current: dict[str, bytes] = {"s-init": b""}  # an entry that is not an event at all
    i = 0
    while i < len(order):
        step = draw(st.integers(1, 3))
        for j in order[i : i + step]:
            current[pool[j][0]] = pool[j][1]
        i += step
        change = draw(st.integers(0, 11))
        if change == 0 and current:
            current.pop(min(current))
        elif change == 1 and current:
            key = max(current)
            current[key] = current[key][:-1] + b"\0"
        versions.append((dict(current), draw(st.integers(0, 7)) == 0))
    return versions


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.booleans())
def test_incremental_fold_equals_a_fresh_fold(versions, key_change):
    cache = EventCache()
    incremental = SessionFold("s", cache=cache)
    for n, (events, receipt) in enumerate(versions):
        # Halfway through, a device's key may appear only now (its earlier events were unknown).
        ring = (
            KEYRING
            if not key_change or n >= len(versions) // 2
            else Keyring({"charger-1": make_signer("charger-1").public_key})
        )
        got = incremental.update(events, ring, receipt_present=receipt)
        assert got == fold("s", events, ring, receipt_present=receipt, cache=None)


def _meter_session(n: int) -> list[tuple[str, bytes]]:
    signer = make_signer("charger-1")
    out = [signer.sign("authorize", "s", 0), signer.sign("start", "s", 1, meter_wh=0)]
    out += [signer.sign("meter", "s", 2 + i, meter_wh=10 * (i + 1)) for i in range(n)]
    return [(e.event_id, e.encoded) for e in out]


def test_one_new_event_costs_one_verification_and_no_full_fold():
    cache = EventCache()
    session = SessionFold("s", cache=cache)
    events: dict[str, bytes] = {}
    for key, blob in _meter_session(50):
        events[key] = blob
        before = cache.verifications
        view = session.update(events, KEYRING)
        assert cache.verifications == before + 1
    assert view.state == "charging" and view.energy_wh == 500
    assert (session.full_folds, session.incremental_folds) == (1, 51)


def test_a_fresh_fold_of_known_events_verifies_nothing_again():
    cache = EventCache()
    events = dict(_meter_session(20))
    first = fold("s", events, KEYRING, cache=cache)
    assert cache.verifications == 22
    assert fold("s", events, KEYRING, cache=cache) == first
    assert cache.verifications == 22 and cache.hits == 22


def test_a_late_event_refolds_everything_but_verifies_only_itself():
    cache = EventCache()
    pool = _meter_session(5)
    late_key, late_blob = pool.pop(3)  # the second meter reading arrives last
    session = SessionFold("s", cache=cache)
    events = dict(pool)
    session.update(events, KEYRING)
    events[late_key] = late_blob
    view = session.update(events, KEYRING)
    assert view == fold("s", events, KEYRING, cache=None)
    assert session.full_folds == 2 and cache.verifications == 7  # each of the 7 once


def test_the_cache_remembers_a_bad_signature_and_is_bounded():
    cache = EventCache(max_entries=3)
    events = _meter_session(4)
    forged = _forged(events[0][1])
    for _ in range(2):
        view = fold("s", {events[0][0]: forged}, KEYRING, cache=cache)
        assert view.conflicts[0].detail.startswith("bad_signature")
    assert cache.verifications == 1
    # The genuine bytes are other bytes: checked on their own, and accepted.
    assert fold("s", {events[0][0]: events[0][1]}, KEYRING, cache=cache).state == "authorized"
    for key, blob in events:
        fold("s", {key: blob}, KEYRING, cache=cache)
    assert len(cache) == 3


def test_a_signature_checked_under_one_key_is_checked_again_under_another():
    cache = EventCache()
    key, blob = _meter_session(0)[0]
    impostor = Keyring({"charger-1": make_signer("charger-2").public_key})
    assert fold("s", {key: blob}, impostor, cache=cache).conflicts[0].detail.startswith("bad_signature")
    assert fold("s", {key: blob}, KEYRING, cache=cache).state == "authorized"
    assert cache.verifications == 2


def test_a_predecessor_that_arrives_late_has_its_successors_link_checked():
    signer = make_signer("charger-1")
    first = signer.sign("authorize", "s", 0)
    twin = make_signer("charger-1")
    twin.seq, twin.prev = signer.seq, signer.prev
    signer.sign("start", "s", 1, meter_wh=0)  # `second`: never stored here
    other_second = twin.sign("meter", "s", 9, meter_wh=5)  # same seq as `second`, sorts last
    third = signer.sign("stop", "s", 2, meter_wh=7)  # points at `second`
    events = {first.event_id: first.encoded, third.event_id: third.encoded}
    session = SessionFold("s", cache=EventCache())
    session.update(events, KEYRING)
    events[other_second.event_id] = other_second.encoded
    view = session.update(events, KEYRING)
    assert view == fold("s", events, KEYRING, cache=None)
    assert [c.kind for c in view.conflicts] == ["broken_chain", "illegal_transition"]
