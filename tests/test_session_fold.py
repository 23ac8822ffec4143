"""Session documents and the fold of their events into state, energy and conflicts."""

from __future__ import annotations

import cbor2

from crdt import (
    Keyring,
    add_event,
    fold,
    fold_session,
    new_session_doc,
    new_site_config,
    read_site_config,
    set_receipt,
    site_config_put,
)
from crdt._fold import BROKEN_CHAIN, FORK, ILLEGAL_TRANSITION, INVALID_EVENT, METER_BACKWARDS, WRONG_SESSION

from .conftest import make_signer

TARIFF = {"currency": "EUR", "per_kwh_cents": 39, "per_session_cents": 50}


def new_doc(session_id="s-1"):
    return new_session_doc(
        session_id, site="field", charger="c1", connector=1, id_token="tok", tariff=TARIFF, created_by="node-a"
    )


def test_document_layout_and_readback(signer, keyring):
    doc = new_doc()
    data, view = fold_session(doc, keyring)
    assert (data.session_id, data.charger, data.connector, data.id_token) == ("s-1", "c1", 1, "tok")
    assert data.tariff == TARIFF and data.receipt is None and data.events == {}
    assert view.state == "idle" and view.energy_wh == 0 and view.conflicts == ()


def test_full_lifecycle_energy_and_receipt(signer, keyring):
    doc = new_doc()
    for ev in [
        signer.sign("authorize", "s-1", 1),
        signer.sign("start", "s-1", 2, meter_wh=1000),
        signer.sign("meter", "s-1", 3, meter_wh=1500),
        signer.sign("pause", "s-1", 4),
        signer.sign("meter", "s-1", 5, meter_wh=1500),
        signer.sign("resume", "s-1", 6),
        signer.sign("stop", "s-1", 7, meter_wh=4200),
    ]:
        assert add_event(doc, ev)
    _, view = fold_session(doc, keyring)
    assert view.state == "completed"
    assert view.energy_wh == 3200
    assert (view.started_ts, view.stopped_ts) == (2, 7)
    assert view.conflicts == ()
    set_receipt(doc, cbor2.dumps({"session_id": "s-1"}))
    assert fold_session(doc, keyring)[1].state == "reconciled"


def test_reserving_path(signer, keyring):
    events = {e.event_id: e.encoded for e in [signer.sign("reserve", "s", 1), signer.sign("authorize", "s", 2)]}
    assert fold("s", events, keyring).state == "authorized"


def test_adding_an_event_twice_changes_nothing(signer, keyring):
    doc = new_doc()
    ev = signer.sign("authorize", "s-1", 1)
    assert add_event(doc, ev)
    heads = doc.get_heads()
    assert not add_event(doc, ev)
    assert doc.get_heads() == heads


def test_illegal_transition_is_reported_not_applied(signer, keyring):
    events = [signer.sign("authorize", "s", 1), signer.sign("resume", "s", 2), signer.sign("start", "s", 3)]
    view = fold("s", {e.event_id: e.encoded for e in events}, keyring)
    assert view.state == "charging"
    assert [(c.kind, c.event_id) for c in view.conflicts] == [(ILLEGAL_TRANSITION, events[1].event_id)]
    assert events[1].event_id not in view.event_ids


def test_meter_backwards_is_reported_not_applied(signer, keyring):
    events = [
        signer.sign("authorize", "s", 1),
        signer.sign("start", "s", 2, meter_wh=500),
        signer.sign("meter", "s", 3, meter_wh=400),
        signer.sign("stop", "s", 4, meter_wh=900),
    ]
    view = fold("s", {e.event_id: e.encoded for e in events}, keyring)
    assert [(c.kind, c.event_id) for c in view.conflicts] == [(METER_BACKWARDS, events[2].event_id)]
    assert view.state == "completed" and view.energy_wh == 400


def test_fork_in_a_device_chain(keyring):
    a = make_signer("charger-1")
    first = a.sign("authorize", "s", 1)
    fork_signer = make_signer("charger-1")
    fork_signer.seq, fork_signer.prev = a.seq, a.prev
    left = a.sign("start", "s", 2, meter_wh=10)
    right = fork_signer.sign("start", "s", 2, meter_wh=20)
    view = fold("s", {e.event_id: e.encoded for e in (first, left, right)}, keyring)
    winner, loser = sorted([left, right], key=lambda e: e.event_id)
    assert [(c.kind, c.event_id) for c in view.conflicts] == [(FORK, loser.event_id)]
    assert winner.event_id in view.event_ids and view.state == "charging"


def test_broken_chain_inside_a_document(keyring):
    a = make_signer("charger-1")
    first = a.sign("authorize", "s", 1)
    a.prev = bytes(32)
    second = a.sign("start", "s", 2)
    view = fold("s", {e.event_id: e.encoded for e in (first, second)}, keyring)
    assert [(c.kind, c.event_id) for c in view.conflicts] == [(BROKEN_CHAIN, second.event_id)]
    assert view.state == "authorized"


def test_invalid_and_foreign_events_are_reported(signer, keyring):
    good = signer.sign("authorize", "s", 1)
    other = signer.sign("start", "other-session", 2)
    stranger = make_signer("stranger").sign("start", "s", 3)
    events = {
        good.event_id: good.encoded,
        other.event_id: other.encoded,
        stranger.event_id: stranger.encoded,
        "junk": b"\x00\x01",
    }
    view = fold("s", events, keyring)
    kinds = {c.event_id: c.kind for c in view.conflicts}
    assert kinds == {other.event_id: WRONG_SESSION, stranger.event_id: INVALID_EVENT, "junk": INVALID_EVENT}
    assert "unknown_key" in next(c.detail for c in view.conflicts if c.event_id == stranger.event_id)
    assert view.state == "authorized"


def test_events_from_two_devices_fold_in_timestamp_order(keyring):
    a, b = make_signer("charger-1"), make_signer("charger-2")
    ring = Keyring({"charger-1": a.public_key, "charger-2": b.public_key})
    events = [a.sign("authorize", "s", 1), a.sign("start", "s", 2, meter_wh=0), b.sign("stop", "s", 3, meter_wh=70)]
    assert fold("s", {e.event_id: e.encoded for e in events}, ring).state == "completed"


def test_site_config_genesis_is_shared_and_merges():
    one, two = new_site_config("field"), new_site_config("field")
    genesis = one.get_heads()
    assert len(genesis) == 1 and two.get_heads() == genesis
    assert one.get_actor() != two.get_actor()
    site_config_put(one, "tariffs", "default", {"per_kwh_cents": 39})
    site_config_put(two, "id_tokens_allowed", "tok-9", True)
    one.merge(two)
    two.merge(one)
    assert one.get_heads() == two.get_heads()
    content = read_site_config(one)
    assert content["tariffs"] == {"default": {"per_kwh_cents": 39}}
    assert content["id_tokens_allowed"] == {"tok-9": True}
    # Both edits were made on top of the shared genesis, which the merged copies still contain.
    assert one.get_heads() != genesis and len(one.get_changes(genesis)) == 2
    # Another site's genesis is another change: its copies would never merge with this site's.
    other = new_site_config("other-site")
    assert other.get_heads() != genesis and other.get_heads() == new_site_config("other-site").get_heads()


def test_declared_device_keys_are_trusted_only_when_asked():
    stranger = make_signer("stranger")
    doc = new_doc()
    add_event(doc, stranger.sign("authorize", "s-1", 1), public_key=stranger.public_key)
    assert fold_session(doc, Keyring())[1].conflicts[0].kind == INVALID_EVENT
    assert fold_session(doc, Keyring(), trust_document_keys=True)[1].state == "authorized"
    # A key in the keyring wins over a declared one.
    liar = make_signer("other")
    ring = Keyring({"stranger": liar.public_key})
    assert fold_session(doc, ring, trust_document_keys=True)[1].conflicts[0].kind == INVALID_EVENT
