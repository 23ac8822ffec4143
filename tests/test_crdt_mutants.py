"""What mutation testing of crdt/ found untested (docs/testing.md, "mutation" tier).

Each test here pins down behaviour that a surviving mutant changed without any other fast
test noticing: the facts a conflict reports (the cloud files them for review and the node API
shows them), the view's meter and receipt fields, that one broken chain does not stop the fold
from applying the rest, and the JSON views of events and conflicts.
"""

from __future__ import annotations

import cbor2
import nacl.signing
import pytest
from automerge.core import ROOT, Document, Message, ObjType, ScalarType

from crdt import (
    GENESIS_PREV,
    MAX_EVENT_BYTES,
    BadSignature,
    BrokenChain,
    DocumentError,
    EventSigner,
    InvalidSyncMessage,
    Keyring,
    LocalError,
    MalformedEvent,
    MissingField,
    Replica,
    SyncBook,
    UnknownKey,
    add_event,
    add_note,
    bucket_entries,
    bucket_of,
    check_link,
    decode_event,
    decode_sync_message,
    differing_buckets,
    fold,
    heads_hash,
    make_digest,
    new_session_doc,
    new_site_config,
    read_session,
    read_site_config,
    set_receipt,
    site_config_put,
    summarize_event,
    verify_event,
)
from crdt._events import _content_id
from crdt._sync import _is_engine_error, check_sync_message
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
        "kind": ILLEGAL_TRANSITION,
        "event_id": illegal.event_id,
        "detail": "'resume' in state 'charging'",
    }


def test_a_broken_chain_is_reported_and_the_fold_goes_on():
    a, other_branch, b = fresh("charger-1"), fresh("charger-1"), fresh("charger-2")
    first = a.sign("authorize", "s", 1)
    other_branch.sign("reserve", "s", 1)  # not in the document
    broken = other_branch.sign("start", "s", 2, meter_wh=0)  # seq 2, but points at the reserve
    rest = [
        b.sign("start", "s", 3, meter_wh=10),
        b.sign("meter", "s", 4, meter_wh=70),
        b.sign("stop", "s", 5, meter_wh=90),
    ]
    view = fold("s", {e.event_id: e.encoded for e in [first, broken, *rest]}, RING)
    assert [(c.kind, c.event_id) for c in view.conflicts] == [(BROKEN_CHAIN, broken.event_id)]
    assert view.conflicts[0].detail == f"event {broken.event_id} (seq 2) does not point at the hash of seq 1"
    assert view.event_ids == (first.event_id, *(e.event_id for e in rest))
    assert view.state == "completed"


def test_the_view_reports_first_and_last_meter_times_and_the_receipt():
    a = fresh("charger-1")
    events = [
        a.sign("authorize", "s", 1),
        a.sign("start", "s", 2, meter_wh=100),
        a.sign("meter", "s", 3, meter_wh=150),
        a.sign("stop", "s", 4, meter_wh=180),
    ]
    blobs = {e.event_id: e.encoded for e in events}
    view = fold("s", blobs, RING, receipt_present=True)
    assert (view.state, view.energy_wh, view.first_meter_wh, view.last_meter_wh) == ("reconciled", 80, 100, 180)
    assert (view.started_ts, view.stopped_ts, view.receipt_present) == (2, 4, True)
    assert fold("s", blobs, RING).receipt_present is False
    # Nothing started or stopped, no meter: None, not some other falsy value.
    idle = fold("s", {events[0].event_id: events[0].encoded}, RING)
    assert (idle.started_ts, idle.stopped_ts, idle.first_meter_wh, idle.last_meter_wh, idle.energy_wh) == (
        None,
        None,
        None,
        None,
        0,
    )


def test_summarize_event_is_the_event_as_json():
    a = fresh("charger-1")
    a.sign("authorize", "s", 1)
    event = a.sign("meter", "s", 7, meter_wh=42)
    assert summarize_event(event) == {
        "event_id": event.event_id,
        "type": "meter",
        "device_id": "charger-1",
        "seq": 2,
        "ts": 7,
        "meter_wh": 42,
    }


# --------------------------------------------------------------------------
# crdt/_events.py: every refusal of decode_event / verify_event says what is wrong and which
# event it was (fold files `reason: message` as the conflict's detail), and the limits are where
# the docstrings put them.


def _body_and_sig(**changes):
    """A charger-1 event's body and signature, with `changes` applied and its event_id
    recomputed (unless event_id is among the changes), so the later checks are reached."""
    signer = fresh("charger-1")
    event = signer.sign("meter", "s", 5, meter_wh=10)
    body = {**event.record.to_map(), **changes}
    if "event_id" not in changes:
        body["event_id"] = _content_id({k: v for k, v in body.items() if k != "event_id"})
    return body, event.signature


def _blob(sig=None, drop=(), **changes) -> bytes:
    body, signature = _body_and_sig(**changes)
    for name in drop:
        body.pop(name)
    return cbor2.dumps({**body, "sig": signature if sig is None else sig}, canonical=True)


@pytest.mark.parametrize(
    "blob, error, message, has_id",
    [
        ("text", MalformedEvent, "an event is bytes, got str", False),
        (
            b"\xa0" * (MAX_EVENT_BYTES + 1),
            MalformedEvent,
            f"event is {MAX_EVENT_BYTES + 1} bytes, more than the {MAX_EVENT_BYTES} allowed",
            False,
        ),
        (b"\x00" * MAX_EVENT_BYTES, MalformedEvent, "an event is a CBOR map, got int", False),  # at the limit: parsed
        (cbor2.dumps([1]), MalformedEvent, "an event is a CBOR map, got list", False),
        (_blob(drop=("ts",)), MissingField, "event has no 'ts' field", True),
        (_blob(drop=("ts",), event_id=7), MissingField, "event has no 'ts' field", False),
        (_blob(x=1), MalformedEvent, "event has unknown fields ['x']", True),
        (_blob(seq="1"), MalformedEvent, "event field 'seq' has type str", True),
        (_blob(meter_wh=True), MalformedEvent, "event field 'meter_wh' has type bool", True),
        (_blob(type=""), MalformedEvent, "event field 'type' is empty or too long", True),
        (_blob(session_id="s" * 257), MalformedEvent, "event field 'session_id' is empty or too long", True),
        (_blob(seq=0), MalformedEvent, "event seq must be >= 1 and prev 32 bytes", True),
        (_blob(prev=bytes(31)), MalformedEvent, "event seq must be >= 1 and prev 32 bytes", True),
        (_blob(meter_wh=-1), MalformedEvent, "event meter_wh must not be negative", True),
        (_blob(sig=bytes(63)), MalformedEvent, "event signature must be 64 bytes", True),
        (_blob(sig="x" * 64), MalformedEvent, "event signature must be 64 bytes", True),
        (_blob(event_id="0" * 32), MalformedEvent, "event_id does not match the event's content", True),
    ],
)
def test_decode_event_refusals_say_what_and_which(blob, error, message, has_id):
    with pytest.raises(error) as info:
        decode_event(blob)
    assert type(info.value) is error and str(info.value) == message
    if has_id:
        obj = cbor2.loads(blob)
        assert info.value.event_id == obj["event_id"] and isinstance(info.value.event_id, str)
    else:
        assert info.value.event_id is None


def test_decode_event_refusal_of_bad_cbor_carries_the_parser_error():
    with pytest.raises(MalformedEvent) as info:
        decode_event(b"\xff")
    assert str(info.value).startswith("event is not valid CBOR: ") and len(str(info.value)) > 26


@pytest.mark.parametrize("changes", [{"meter_wh": 0}, {"session_id": "s" * 256}, {"meter_wh": None}])
def test_decode_event_accepts_the_edges(changes):
    body, sig = decode_event(_blob(**changes))
    assert {k: body[k] for k in changes} == changes and len(sig) == 64


def test_verify_event_refusals_and_result():
    good = fresh("charger-1")
    event = good.sign("authorize", "s", 1)
    with pytest.raises(UnknownKey) as info:
        verify_event(event.encoded, Keyring())
    assert (str(info.value), info.value.event_id) == ("device 'charger-1' is not in the keyring", event.event_id)
    impostor = Keyring({"charger-1": B.public_key})
    with pytest.raises(BadSignature) as info:
        verify_event(event.encoded, impostor)
    assert (str(info.value), info.value.event_id) == (
        f"signature of event {event.event_id} does not match device 'charger-1'",
        event.event_id,
    )
    verified = verify_event(event.encoded, RING)
    assert (verified.signature, verified.encoded, verified.chain_hash) == (
        event.signature,
        event.encoded,
        event.chain_hash,
    )
    assert len(verified.event_id) == 32 and int(verified.event_id, 16) >= 0
    assert verified.record.to_map() == {
        "event_id": event.event_id,
        "type": "authorize",
        "device_id": "charger-1",
        "session_id": "s",
        "seq": 1,
        "prev": GENESIS_PREV,
        "ts": 1,
        "meter_wh": None,
        "data": {},
    }


def test_check_link_refusals_name_the_event():
    a, b = fresh("charger-1"), fresh("charger-2")
    first = a.sign("authorize", "s", 1)
    a.sign("start", "s", 2)
    third = a.sign("stop", "s", 3)  # seq 3 after seq 1
    with pytest.raises(BrokenChain) as info:
        check_link(first, third)
    assert (str(info.value), info.value.event_id) == (f"event {third.event_id} has seq 3, expected 2", third.event_id)
    branch = fresh("charger-1")
    branch.sign("reserve", "s", 1)
    other_second = branch.sign("start", "s", 2)
    with pytest.raises(BrokenChain) as info:
        check_link(first, other_second)
    assert (str(info.value), info.value.event_id) == (
        f"event {other_second.event_id} (seq 2) does not point at the hash of seq 1",
        other_second.event_id,
    )
    with pytest.raises(LocalError, match="^check_link compares two events of the same device$"):
        check_link(first, b.sign("authorize", "s", 1))


def test_signer_and_keyring_checks():
    key = nacl.signing.SigningKey(b"k" * 32)
    for bad in ("", "d" * 257):
        with pytest.raises(LocalError, match="^device_id must be a non-empty string of at most 256 characters$"):
            EventSigner(bad, key)
    assert EventSigner("d" * 256, key).device_id == "d" * 256
    signer = EventSigner("charger-1", key, seq=4, prev=b"p" * 32)
    assert (signer.seq, signer.prev, signer.signing_key) == (4, b"p" * 32, key)
    # resume continues after this device's highest seq, whatever the order and other devices.
    mine = EventSigner("charger-1", key)
    events = [mine.sign("authorize", "s", 1), mine.sign("start", "s", 2), mine.sign("stop", "s", 3)]
    theirs = EventSigner("charger-2", key, seq=9).sign("authorize", "s", 1)
    resumed = EventSigner.resume("charger-1", key, [events[2], theirs, events[0], events[1]])
    assert (resumed.seq, resumed.prev) == (3, events[2].chain_hash)
    fresh_one = EventSigner.resume("charger-3", key, events)
    assert (fresh_one.seq, fresh_one.prev, fresh_one.signing_key) == (0, GENESIS_PREV, key)
    # to_map hands out a copy: editing it leaves the (frozen) record as it was.
    record = events[0].record
    mapped = record.to_map()
    mapped["data"]["x"] = 1
    assert record.data == {} and record.to_map()["data"] == {}
    ring = Keyring({"charger-1": A.public_key})
    assert "charger-1" in ring and "charger-2" not in ring
    with pytest.raises(LocalError, match="^an Ed25519 public key is 32 bytes, got 31$"):
        ring.add("x", bytes(31))


# --------------------------------------------------------------------------
# crdt/_documents.py: what goes into a document comes back out, and a document that is not a
# session or site config is refused with a message that names what is wrong.


NESTED = {
    "currency": "EUR",
    "per_kwh_cents": 39,
    "vat": 0.19,
    "active": True,
    "note": None,
    "blob": b"\x00\x01",
    "bands": [{"from": 0, "cents": 30}, {"from": 22, "cents": [1, 2.5, "x", None, False, b"b", [3, {"y": 4}]]}],
    "empty": {},
    "none": [],
}


def test_any_plain_value_round_trips_through_a_session_document():
    doc = new_session_doc(
        "s-9",
        site="depot",
        charger="c7",
        connector=2,
        id_token="tok",
        tariff=NESTED,
        created_by="node-b",
        actor=b"\x01" * 16,
    )
    assert doc.get_actor() == b"\x01" * 16
    data = read_session(doc)
    assert (data.session_id, data.site, data.charger, data.connector, data.id_token, data.created_by) == (
        "s-9",
        "depot",
        "c7",
        2,
        "tok",
        "node-b",
    )
    tariff = dict(data.tariff)
    tariff["blob"] = bytes(tariff["blob"])
    inner = tariff["bands"][1]["cents"]
    inner[5] = bytes(inner[5])
    assert tariff == NESTED
    assert data.notes == {} and data.receipt is None and data.events == {} and data.devices == {}
    add_note(doc, "n1", "checked by hand")
    set_receipt(doc, b"receipt-bytes")
    data = read_session(doc)
    assert data.notes == {"n1": "checked by hand"} and data.receipt == b"receipt-bytes"
    with pytest.raises(LocalError, match="^cannot store a set in a document$"):
        new_session_doc("s", site="x", charger="c", connector=1, id_token="t", tariff={"x": {1}}, created_by="n")


def test_site_config_holds_nested_values_and_refuses_other_documents():
    doc = new_site_config("depot", actor=b"\x02" * 16)
    assert doc.get_actor() == b"\x02" * 16
    site_config_put(doc, "tariffs", "default", {"per_kwh_cents": 39, "bands": [1, {"a": None}]})
    site_config_put(doc, "id_tokens_allowed", "tok-1", b"entry")
    config = read_site_config(doc)
    assert config["site"] == "depot"
    assert config["tariffs"] == {"default": {"per_kwh_cents": 39, "bands": [1, {"a": None}]}}
    assert bytes(config["id_tokens_allowed"]["tok-1"]) == b"entry"
    with pytest.raises(LocalError, match="site config has no section 'nope'"):
        site_config_put(doc, "nope", "k", 1)
    with pytest.raises(DocumentError, match="^not a site-config document$"):
        read_site_config(
            new_session_doc("s", site="x", charger="c", connector=1, id_token="t", tariff={}, created_by="n")
        )


def _session_with(**overrides):
    doc = Document()
    with doc.transaction() as tx:
        values = {"session_id": "s", "site": "x", "charger": "c", "id_token": "t", "created_by": "n", "connector": 1}
        values.update(overrides)
        for key, value in values.items():
            if value is None:
                continue
            kind = (
                ScalarType.Boolean
                if isinstance(value, bool)
                else (ScalarType.Int if isinstance(value, int) else ScalarType.Str)
            )
            tx.put(ROOT, key, kind, value)
        events = tx.put_object(ROOT, "events", ObjType.Map)
        tx.put(events, "odd", ScalarType.Str, "not bytes")
        devices = tx.put_object(ROOT, "devices", ObjType.Map)
        tx.put(devices, "d1", ScalarType.Bytes, b"k" * 32)
        tx.put(devices, "big", ScalarType.Bytes, b"k" * 4097)
        tx.put(devices, "edge", ScalarType.Bytes, b"c" * 4096)  # a certificate at the size limit
        tx.put(ROOT, "receipt", ScalarType.Str, "not bytes")
        tx.put(devices, "text", ScalarType.Str, "x")
    return doc


@pytest.mark.parametrize(
    "key, value, kind",
    [
        ("session_id", None, "str"),
        ("site", 5, "str"),
        ("charger", None, "str"),
        ("id_token", None, "str"),
        ("created_by", 7, "str"),
        ("connector", "1", "int"),
        ("connector", True, "int"),
    ],
)
def test_read_session_names_the_bad_field(key, value, kind):
    with pytest.raises(DocumentError) as info:
        read_session(_session_with(**{key: value}))
    assert str(info.value) == f"session document field {key!r} is missing or not {kind}"


def test_read_session_reads_a_foreign_document_defensively():
    data = read_session(_session_with())
    assert data.events == {"odd": b""}  # kept, so the fold reports it as invalid
    assert data.devices == {"d1": b"k" * 32, "edge": b"c" * 4096}  # oversized and non-bytes entries left out
    assert data.tariff == {} and data.notes == {} and data.receipt is None
    with pytest.raises(DocumentError, match="^document has no 'notes' map$"):
        add_note(_session_with(), "n", "x")
    no_events = Document()
    with no_events.transaction() as tx:
        for key in ("session_id", "site", "charger", "id_token", "created_by"):
            tx.put(ROOT, key, ScalarType.Str, "v")
        tx.put(ROOT, "connector", ScalarType.Int, 1)
        tx.put(ROOT, "events", ScalarType.Str, "not a map")
    with pytest.raises(DocumentError, match="^document has no 'events' map$"):
        read_session(no_events)


def test_read_session_of_a_document_with_only_the_required_fields():
    doc = Document()
    with doc.transaction() as tx:
        for key in ("session_id", "site", "charger", "id_token", "created_by"):
            tx.put(ROOT, key, ScalarType.Str, "v")
        tx.put(ROOT, "connector", ScalarType.Int, 1)
        tx.put_object(ROOT, "events", ObjType.Map)
    data = read_session(doc)
    assert (data.devices, data.tariff, data.notes, data.receipt, data.events) == ({}, {}, {}, None, {})


# --------------------------------------------------------------------------
# crdt/_sync.py: the digest is a wire format (nodes of different versions compare digests), so
# its bucket choice, hash lengths and layout are pinned; the sync book forgets exactly what it
# is told to.


def test_the_digest_wire_format_is_pinned():
    assert bucket_of("session-00042") == 18 and bucket_of("s-1", 1000) == 639
    assert heads_hash([b"\x02" * 32, b"\x01" * 32]).hex() == "f818afd37a6dc3bc"  # order-free, 8 bytes
    digest = make_digest({"a": b"\x11" * 8, "b": b"\x22" * 8, "session-00042": b"\x33" * 8}, 16)
    assert [i for i, d in enumerate(digest) if d != bytes(8)] == [2, 6]
    assert (digest[2].hex(), digest[6].hex()) == ("34d255664d145b1a", "7ef4b6b3967ad08f")
    assert all(len(d) == 8 for d in digest)
    assert make_digest({"x": b"\x01" * 8}) != make_digest({"x": b"\x02" * 8})


def test_differing_buckets_refuses_digests_of_other_sizes():
    assert differing_buckets([b"a", b"b", b"c"], [b"a", b"x", b"c"]) == [1]
    with pytest.raises(LocalError, match="^digests with different bucket counts cannot be compared$"):
        differing_buckets([b"a", b"b"], [b"a"])


def test_the_sync_book_forgets_exactly_what_it_is_told():
    book = SyncBook()
    states = {(p, d): book.state(p, d) for p in ("p1", "p2") for d in ("d1", "d2")}
    assert book.state("p1", "d1") is states[("p1", "d1")]  # kept between calls
    book.reset("p1", "d1")
    book.reset("p9", "d9")  # unknown: harmless
    assert book.state("p1", "d1") is not states[("p1", "d1")]
    assert book.state("p1", "d2") is states[("p1", "d2")]
    book.forget_doc("d2")
    assert book.state("p1", "d2") is not states[("p1", "d2")] and book.state("p2", "d2") is not states[("p2", "d2")]
    assert book.state("p2", "d1") is states[("p2", "d1")]
    kept = book.state("p1", "d1")
    book.forget_peer("p2")
    assert book.state("p2", "d1") is not states[("p2", "d1")]
    assert book.state("p1", "d1") is kept


# --------------------------------------------------------------------------
# crdt/_sync.py: what a peer's sync message may do. The checks in front of Automerge read
# LEB128 numbers and Bloom-filter headers; a refused message resets the sync state of that
# (peer, document) only; a new document is adopted only whole, with one root, and validated.


def _uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _carrying(*changes: bytes) -> bytes:
    """A sync message (no heads, no need, no have) that carries these raw changes."""
    return b"\x42\x00\x00\x00" + _uleb(len(changes)) + b"".join(_uleb(len(c)) + c for c in changes)


def _with_bloom(bloom: bytes) -> bytes:
    """A sync message with one `have` entry (no last-sync hashes) holding this Bloom filter."""
    return b"\x42\x00\x00\x01\x00" + _uleb(len(bloom)) + bloom + b"\x00"


def _bloom(entries: int, bits_per_entry: int, probes: int, size: int | None = None) -> bytes:
    if size is None:
        size = (entries * bits_per_entry + 7) // 8
    return _uleb(entries) + _uleb(bits_per_entry) + _uleb(probes) + bytes(size)


def _session(doc_id: str) -> Document:
    return new_session_doc(doc_id, site="x", charger="c", connector=1, id_token="t", tariff={}, created_by="n")


@pytest.mark.parametrize("count", [0, 1, 127, 128, 300, 16_384])
def test_the_change_count_of_a_sync_message_is_read_whatever_its_length(count):
    assert check_sync_message(_carrying(*[b""] * count)) == count


def test_a_leb128_number_may_take_ten_bytes_but_not_eleven():
    ten = b"\x80" * 9 + b"\x00"  # zero, written long: still a 64-bit number
    assert check_sync_message(b"\x42" + ten + b"\x00\x00\x00") == 0
    with pytest.raises(InvalidSyncMessage, match="^sync message: truncated or overlong LEB128 number$"):
        check_sync_message(b"\x42" + b"\x80" * 10 + b"\x00" + b"\x00\x00\x00")
    with pytest.raises(InvalidSyncMessage, match="^sync message: truncated or overlong LEB128 number$"):
        check_sync_message(b"\x42\x00\x00\x00\x80")  # a number cut off by the end
    with pytest.raises(InvalidSyncMessage, match="^sync message: a field runs past the end$"):
        check_sync_message(b"\x42\x00\x00\x00\x01\x05abcd")  # a change one byte short


@pytest.mark.parametrize(
    "bloom",
    [
        b"",  # no filter at all
        _bloom(0, 0, 0),  # an empty filter
        _bloom(1, 10, 7),  # what Automerge itself sends
        _bloom(1, 8, 1),
        _bloom(3, 3, 64),
        _bloom(2, 1, 7),
    ],
    ids=["none", "empty", "automerge", "one-byte", "max-probes", "one-bit"],
)
def test_sound_bloom_filters_pass(bloom):
    assert check_sync_message(_with_bloom(bloom)) == 0


@pytest.mark.parametrize(
    "bloom,message",
    [
        (_bloom(1, 0, 7), "Bloom filter with 0 bits per entry and 7 probes"),
        (_bloom(1, 10, 0), "Bloom filter with 10 bits per entry and 0 probes"),
        (_bloom(1, 10, 65), "Bloom filter with 10 bits per entry and 65 probes"),
        (_bloom(1, 8, 7, size=2), "Bloom filter size does not match its entries"),
        (_bloom(1, 8, 7, size=0), "Bloom filter size does not match its entries"),
        (_bloom(2, 10, 7, size=2), "Bloom filter size does not match its entries"),
    ],
    ids=["zero-bits", "zero-probes", "too-many-probes", "too-long", "too-short", "rounded-down"],
)
def test_bloom_filters_that_would_crash_or_exhaust_automerge_are_refused(bloom, message):
    with pytest.raises(InvalidSyncMessage, match=f"^sync message: {message}$"):
        check_sync_message(_with_bloom(bloom))


@pytest.mark.parametrize("data", [bytearray(b"\x42\x00\x00\x00\x00"), "42000000", None, b""])
def test_a_sync_message_is_non_empty_bytes(data):
    with pytest.raises(InvalidSyncMessage, match="^a sync message is non-empty bytes$"):
        decode_sync_message(data)


def test_a_message_automerge_cannot_parse_is_refused_with_its_reason():
    ten = b"\x80" * 9 + b"\x00"  # our reader takes a long zero; Automerge's does not
    with pytest.raises(InvalidSyncMessage, match="^not an Automerge sync message: .+"):
        decode_sync_message(b"\x42" + ten + b"\x00\x00\x00")


def test_changes_that_arrive_before_their_dependencies_wait_for_them():
    source = _session("s")
    add_event(source, A.sign("authorize", "s", 1))
    first, second = source.get_changes([])
    replica = Replica()
    assert replica.receive("peer", "s", _carrying(second.bytes)) == []
    assert "s" not in replica.docs  # not a document yet: its root change has not come
    stored = replica.receive("peer", "s", _carrying(first.bytes))
    assert sorted(stored) == sorted([(first.hash, first.bytes), (second.hash, second.bytes)])
    assert replica.docs["s"].get_heads() == source.get_heads()


def _refused_from_p_resets_only_ps_state_for_s(replica: Replica, message: bytes, match: str) -> None:
    """`replica` refuses `message` from peer p for document s: s is as it was (or still
    absent), p's sync state for s starts afresh, and every other state is kept."""
    heads = replica.docs["s"].get_heads() if "s" in replica.docs else None
    kept = {key: replica.book.state(*key) for key in [("p", "other"), ("q", "s")]}
    state = replica.book.state("p", "s")
    with pytest.raises(InvalidSyncMessage, match=match):
        replica.receive("p", "s", message)
    if heads is None:
        assert "s" not in replica.docs
    else:
        assert replica.docs["s"].get_heads() == heads
    assert replica.book.state("p", "s") is not state
    assert all(replica.book.state(*key) is s for key, s in kept.items())


def test_a_refused_new_document_resets_that_peers_state_for_it_only():
    replica = Replica()
    replica.add("other", _session("other"))
    _refused_from_p_resets_only_ps_state_for_s(
        replica, _carrying(b"\x01\x02\x03"), "^sync message for 's' does not apply: .+"
    )


def test_a_new_document_with_two_roots_is_refused_and_the_sync_starts_afresh():
    twice = _session("s")
    twice.merge(_session("s"))  # two creations under one id: two root changes
    holder, newcomer = Replica({"s": twice}), Replica()
    holder.receive("newcomer", "s", newcomer.generate("holder", "s"))
    state = newcomer.book.state("holder", "s")
    with pytest.raises(
        InvalidSyncMessage, match="^new document 's' is not acceptable: a document has exactly one root change$"
    ):
        newcomer.receive("holder", "s", holder.generate("newcomer", "s"))
    assert "s" not in newcomer.docs
    assert newcomer.book.state("holder", "s") is not state


def test_the_validator_sees_the_whole_new_document_and_its_refusal_resets_the_state():
    source = _session("s")
    add_event(source, A.sign("authorize", "s", 1))
    seen = []

    def refuse(doc: Document) -> None:
        seen.append(doc.get_heads())
        raise DocumentError("not for this site")

    holder, newcomer = Replica({"s": source}), Replica()
    holder.receive("newcomer", "s", newcomer.generate("holder", "s"))
    state = newcomer.book.state("holder", "s")
    with pytest.raises(InvalidSyncMessage, match="^new document 's' is not acceptable: not for this site$"):
        newcomer.receive("holder", "s", holder.generate("newcomer", "s"), validate=refuse)
    assert seen == [source.get_heads()]
    assert "s" not in newcomer.docs and newcomer.book.state("holder", "s") is not state
    # Accepted, it is stored whole: every change, for the caller to make durable.
    holder.book.reset("newcomer", "s")
    holder.receive("newcomer", "s", newcomer.generate("holder", "s"))
    stored = newcomer.receive("holder", "s", holder.generate("newcomer", "s"), validate=lambda doc: None)
    assert sorted(stored) == sorted((c.hash, c.bytes) for c in source.get_changes([]))


def test_a_known_document_returns_only_the_new_changes():
    source = _session("s")
    holder, follower = Replica({"s": source}), Replica()
    follower.receive("holder", "s", _carrying(*(c.bytes for c in source.get_changes([]))))
    before = source.get_heads()
    add_event(source, A.sign("authorize", "s", 1))
    (new,) = source.get_changes(before)
    assert follower.receive("holder", "s", _carrying(new.bytes)) == [(new.hash, new.bytes)]
    assert follower.changes_since("s", before) == [(new.hash, new.bytes)]
    assert holder.heads_hashes(["s", "absent"]) == {"s": heads_hash(source.get_heads())}


def test_a_poisoned_sync_state_is_replaced_not_fatal():
    replica = Replica()
    replica.add("s", _session("s"))
    other = replica.book.state("q", "s")
    state = replica.book.state("p", "s")
    # The state Automerge's next generate_sync_message panics on (check_sync_message now
    # refuses the message that leaves it so): whatever poisons a state, the node goes on.
    replica.docs["s"].receive_sync_message(state, Message.decode(bytes.fromhex("42000001000301000100")))
    message = replica.generate("p", "s")
    assert message is not None and decode_sync_message(message)
    assert replica.book.state("p", "s") is not state and replica.book.state("q", "s") is other


def test_adding_a_document_twice_is_refused():
    replica = Replica()
    assert [h for h, _ in replica.add("s", _session("s"))] == [c.hash for c in replica.docs["s"].get_changes([])]
    with pytest.raises(LocalError, match="^document 's' already exists$"):
        replica.add("s", _session("s"))


def test_an_interrupt_is_not_mistaken_for_a_bad_message():
    class Interrupted:
        """A document whose engine call is cut short by Ctrl-C, not by a peer's bytes."""

        def generate_sync_message(self, state: object) -> None:
            raise KeyboardInterrupt

    replica = Replica({"s": Interrupted()})  # type: ignore[dict-item]
    state = replica.book.state("p", "s")
    with pytest.raises(KeyboardInterrupt):
        replica.generate("p", "s")
    assert replica.book.state("p", "s") is state  # nothing reset: it was not the peer's doing


# --------------------------------------------------------------------------
# crdt/_sync.py, second mutation run (28 November 2026): the survivors that were behaviour.


def test_bucket_entries_pick_by_the_bucket_count_they_are_given():
    heads = {f"s-{i}": bytes([i]) * 8 for i in range(40)}
    for buckets in (7, 1000):
        wanted = {bucket_of("s-3", buckets), bucket_of("s-11", buckets)}
        picked = bucket_entries(heads, wanted, buckets)
        assert picked == {d: hh for d, hh in heads.items() if bucket_of(d, buckets) in wanted}
        assert {"s-3", "s-11"} <= picked.keys() and len(picked) < len(heads)


def test_heads_hashes_of_the_given_documents_only():
    replica = Replica({"a": _session("a"), "b": _session("b")})
    assert replica.heads_hashes(["a"]).keys() == {"a"}
    assert replica.heads_hashes([]) == {}
    assert replica.heads_hashes().keys() == {"a", "b"}


def test_a_holder_without_change_bytes_gets_each_new_changes_hash_with_empty_bytes():
    source = _session("s")
    lean = Replica(change_bytes=False)
    stored = lean.receive("holder", "s", _carrying(*(c.bytes for c in source.get_changes([]))))
    assert stored == [(c.hash, b"") for c in source.get_changes([])]
    before = source.get_heads()
    add_event(source, A.sign("authorize", "s", 1))
    (new,) = source.get_changes(before)
    assert lean.receive("holder", "s", _carrying(new.bytes)) == [(new.hash, b"")]  # only the new one


def test_a_replaced_poisoned_state_is_the_peers_from_then_on():
    replica = Replica()
    replica.add("s", _session("s"))
    state = replica.book.state("p", "s")
    replica.docs["s"].receive_sync_message(state, Message.decode(bytes.fromhex("42000001000301000100")))
    assert replica.generate("p", "s") is not None
    # The fresh state recorded what went out: nothing new to say until the peer answers.
    assert replica.generate("p", "s") is None
    assert replica.book.peers() == {"p"}


def test_a_change_that_does_not_apply_to_a_held_document_is_refused_and_changes_nothing():
    held = _session("s")
    mine, theirs = held.fork(), held.fork()
    theirs.set_actor(mine.get_actor())  # one actor, two different changes with the same seq
    for doc, value in ((mine, "mine"), (theirs, "theirs")):
        with doc.transaction() as tx:
            tx.put(ROOT, "note", ScalarType.Str, value)
    (clash,) = theirs.get_changes(held.get_heads())
    _refused_from_p_resets_only_ps_state_for_s(
        Replica({"s": mine}), _carrying(clash.bytes), "^sync message for 's' does not apply: duplicate seq 1 found"
    )


def test_a_second_history_for_a_held_document_is_refused_and_resets_that_peers_state_only():
    (root,) = _session("s").get_changes([])  # created again elsewhere: another root change
    _refused_from_p_resets_only_ps_state_for_s(
        Replica({"s": _session("s")}),
        _carrying(root.bytes),
        "^sync message for 's' brings a second, unrelated history$",
    )


def test_only_pyo3s_own_panic_is_taken_for_an_engine_error():
    def named(name: str, module: str) -> BaseException:
        kind = type(name, (BaseException,), {"__module__": module})
        return kind()

    assert _is_engine_error(named("PanicException", "pyo3_runtime"))
    assert _is_engine_error(ValueError("bad bytes"))
    assert not _is_engine_error(named("PanicException", "somewhere_else"))
    assert not _is_engine_error(named("OtherError", "pyo3_runtime"))
    assert not _is_engine_error(KeyboardInterrupt())
