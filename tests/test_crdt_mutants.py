"""What mutation testing of crdt/ found untested (docs/testing.md, "mutation" tier).

Each test here pins down behaviour that a surviving mutant changed without any other fast
test noticing: the facts a conflict reports (the cloud files them for review and the node API
shows them), the view's meter and receipt fields, that one broken chain does not stop the fold
from applying the rest, and the JSON views of events and conflicts.
"""

from __future__ import annotations

from crdt import Keyring, fold, summarize_event
from crdt._fold import (
    BROKEN_CHAIN,
    FORK,
    ILLEGAL_TRANSITION,
    INVALID_EVENT,
    METER_BACKWARDS,
    WRONG_SESSION,
)

from .conftest import make_signer

A, B = make_signer("charger-1"), make_signer("charger-2")
RING = Keyring({"charger-1": A.public_key, "charger-2": B.public_key})


def fresh(name: str):
    return make_signer(name)


def by_kind(view):
    return {c.kind: c for c in view.conflicts}


def test_each_conflict_names_what_went_wrong():
    a, b, twin = fresh("charger-1"), fresh("charger-2"), fresh("charger-1")
    events = [a.sign("authorize", "s", 1), a.sign("start", "s", 2, meter_wh=500)]
    twin.sign("authorize", "s", 1), twin.sign("start", "s", 2, meter_wh=500)  # the same two events
    meter, fork = a.sign("meter", "s", 3, meter_wh=600), twin.sign("meter", "s", 3, meter_wh=650)  # seq 3 twice
    illegal = b.sign("resume", "s", 4)  # resume while charging
    backwards = b.sign("meter", "s", 5, meter_wh=400)
    other = b.sign("meter", "other-session", 6, meter_wh=1)
    blobs = {e.event_id: e.encoded for e in [*events, meter, fork, illegal, backwards, other]}
    misfiled = a.sign("meter", "s", 7, meter_wh=700)
    blobs["not-its-id"] = misfiled.encoded
    view = fold("s", blobs, RING)
    kinds = by_kind(view)
    assert set(kinds) == {METER_BACKWARDS, FORK, ILLEGAL_TRANSITION, WRONG_SESSION, INVALID_EVENT}
    winner, loser = sorted([meter, fork], key=lambda e: e.event_id)
    assert kinds[FORK].event_id == loser.event_id
    assert kinds[FORK].detail == f"device 'charger-1' seq 3 also signed {winner.event_id}"
    assert kinds[METER_BACKWARDS].detail == f"meter 400 Wh after {winner.record.meter_wh} Wh"
    assert kinds[ILLEGAL_TRANSITION].detail == "'resume' in state 'charging'"
    assert kinds[WRONG_SESSION].detail == "event belongs to session 'other-session'"
    assert kinds[INVALID_EVENT].event_id == "not-its-id"
    assert kinds[INVALID_EVENT].detail == f"stored under another id ({misfiled.event_id})"
    assert kinds[ILLEGAL_TRANSITION].to_json() == {
        "kind": ILLEGAL_TRANSITION, "event_id": illegal.event_id, "detail": "'resume' in state 'charging'"}


def test_a_broken_chain_is_reported_and_the_fold_goes_on():
    a, other_branch, b = fresh("charger-1"), fresh("charger-1"), fresh("charger-2")
    first = a.sign("authorize", "s", 1)
    other_branch.sign("reserve", "s", 1)  # not in the document
    broken = other_branch.sign("start", "s", 2, meter_wh=0)  # seq 2, but points at the reserve
    rest = [b.sign("start", "s", 3, meter_wh=10), b.sign("meter", "s", 4, meter_wh=70), b.sign("stop", "s", 5, meter_wh=90)]
    view = fold("s", {e.event_id: e.encoded for e in [first, broken, *rest]}, RING)
    assert [(c.kind, c.event_id) for c in view.conflicts] == [(BROKEN_CHAIN, broken.event_id)]
    assert view.conflicts[0].detail == f"event {broken.event_id} (seq 2) does not point at the hash of seq 1"
    assert view.event_ids == (first.event_id, *(e.event_id for e in rest))
    assert view.state == "completed"


def test_the_view_reports_first_and_last_meter_times_and_the_receipt():
    a = fresh("charger-1")
    events = [a.sign("authorize", "s", 1), a.sign("start", "s", 2, meter_wh=100), a.sign("meter", "s", 3, meter_wh=150),
              a.sign("stop", "s", 4, meter_wh=180)]
    blobs = {e.event_id: e.encoded for e in events}
    view = fold("s", blobs, RING, receipt_present=True)
    assert (view.state, view.energy_wh, view.first_meter_wh, view.last_meter_wh) == ("reconciled", 80, 100, 180)
    assert (view.started_ts, view.stopped_ts, view.receipt_present) == (2, 4, True)
    assert fold("s", blobs, RING).receipt_present is False
    # Nothing started or stopped, no meter: None, not some other falsy value.
    idle = fold("s", {events[0].event_id: events[0].encoded}, RING)
    assert (idle.started_ts, idle.stopped_ts, idle.first_meter_wh, idle.last_meter_wh, idle.energy_wh) == (
        None, None, None, None, 0)


def test_summarize_event_is_the_event_as_json():
    a = fresh("charger-1")
    a.sign("authorize", "s", 1)
    event = a.sign("meter", "s", 7, meter_wh=42)
    assert summarize_event(event) == {
        "event_id": event.event_id, "type": "meter", "device_id": "charger-1", "seq": 2, "ts": 7, "meter_wh": 42}
