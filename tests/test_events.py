"""Signed event records: signing, verification, and every verification error."""

from __future__ import annotations

import cbor2
import nacl.signing
import pytest

from crdt import (
    GENESIS_PREV,
    MAX_EVENT_BYTES,
    BadSignature,
    BrokenChain,
    EventSigner,
    Keyring,
    MalformedEvent,
    MissingField,
    UnknownKey,
    decode_event,
    verify_event,
)

from .conftest import make_signer


def test_sign_then_verify_returns_the_record(signer, keyring):
    event = signer.sign("start", "s-1", 1_000, meter_wh=120, data={"connector": 1})
    got = verify_event(event.encoded, keyring)
    assert got.record == event.record
    assert got.record.seq == 1 and got.record.prev == GENESIS_PREV
    assert got.record.meter_wh == 120 and dict(got.record.data) == {"connector": 1}
    assert got.chain_hash == event.chain_hash


def test_chain_links_each_event_to_the_previous(signer, keyring):
    first = signer.sign("start", "s-1", 1)
    second = signer.sign("meter", "s-1", 2, meter_wh=5)
    assert second.record.seq == 2 and second.record.prev == first.chain_hash
    assert verify_event(second.encoded, keyring, previous=first).record == second.record


def test_event_id_depends_on_content():
    a = make_signer("d").sign("meter", "s", 1, meter_wh=1)
    b = make_signer("d").sign("meter", "s", 1, meter_wh=2)  # same device and seq: a fork
    assert a.record.seq == b.record.seq and a.event_id != b.event_id


def test_resume_continues_the_chain(signer, keyring):
    events = [signer.sign("meter", "s", i, meter_wh=i) for i in range(1, 4)]
    resumed = EventSigner.resume(signer.device_id, signer.signing_key, reversed(events))
    nxt = resumed.sign("stop", "s", 9, meter_wh=9)
    verify_event(nxt.encoded, keyring, previous=events[-1])


# --- every error type, each from a real bad input ---------------------------------


def test_bad_signature_when_signature_bytes_are_altered(signer, keyring):
    event = signer.sign("start", "s", 1)
    body = cbor2.loads(event.encoded)
    body["sig"] = bytes([body["sig"][0] ^ 1]) + body["sig"][1:]
    with pytest.raises(BadSignature) as info:
        verify_event(cbor2.dumps(body, canonical=True), keyring)
    assert info.value.event_id == event.event_id


def test_bad_signature_when_signed_by_another_key(keyring):
    impostor = EventSigner("charger-1", nacl.signing.SigningKey(b"x" * 32))
    event = impostor.sign("start", "s", 1)
    with pytest.raises(BadSignature):
        verify_event(event.encoded, keyring)


def test_tampered_field_is_refused(signer, keyring):
    event = signer.sign("meter", "s", 1, meter_wh=100)
    body = cbor2.loads(event.encoded)
    body["meter_wh"] = 1  # change the content but keep event_id: id no longer matches
    with pytest.raises(MalformedEvent, match="does not match"):
        verify_event(cbor2.dumps(body, canonical=True), keyring)


def test_tampered_field_with_recomputed_id_fails_signature(signer, keyring):
    from crdt._events import _content_id

    event = signer.sign("meter", "s", 1, meter_wh=100)
    body = cbor2.loads(event.encoded)
    sig = body.pop("sig")
    body["meter_wh"] = 1
    body["event_id"] = _content_id(body)
    with pytest.raises(BadSignature):
        verify_event(cbor2.dumps({**body, "sig": sig}, canonical=True), keyring)


def test_unknown_key(signer):
    event = signer.sign("start", "s", 1)
    with pytest.raises(UnknownKey, match="charger-1"):
        verify_event(event.encoded, Keyring())


def test_broken_chain_wrong_prev(keyring):
    a = make_signer("charger-1")
    first = a.sign("start", "s", 1)
    a.prev = bytes(32)  # the device forgets its chain
    second = a.sign("meter", "s", 2, meter_wh=1)
    with pytest.raises(BrokenChain, match="does not point"):
        verify_event(second.encoded, keyring, previous=first)


def test_broken_chain_seq_gap(signer, keyring):
    first = signer.sign("start", "s", 1)
    signer.sign("meter", "s", 2, meter_wh=1)
    third = signer.sign("meter", "s", 3, meter_wh=2)
    with pytest.raises(BrokenChain, match="expected 2"):
        verify_event(third.encoded, keyring, previous=first)


@pytest.mark.parametrize(
    "blob",
    [b"\xff\xfe garbage", b"", b"\x9f", cbor2.dumps([1, 2, 3]), cbor2.dumps("text")],
    ids=["garbage", "empty", "truncated-array", "list", "string"],
)
def test_malformed_cbor(blob, keyring):
    with pytest.raises(MalformedEvent):
        verify_event(blob, keyring)


def test_truncated_event(signer, keyring):
    event = signer.sign("start", "s", 1)
    with pytest.raises(MalformedEvent):
        verify_event(event.encoded[:-10], keyring)


def test_oversized_event(keyring):
    with pytest.raises(MalformedEvent, match="more than"):
        verify_event(b"\0" * (MAX_EVENT_BYTES + 1), keyring)


@pytest.mark.parametrize("field", ["event_id", "type", "seq", "prev", "meter_wh", "data", "sig"])
def test_missing_field(field, signer, keyring):
    body = cbor2.loads(signer.sign("meter", "s", 1, meter_wh=3).encoded)
    del body[field]
    with pytest.raises(MissingField, match=field):
        verify_event(cbor2.dumps(body, canonical=True), keyring)


@pytest.mark.parametrize(
    "field,value",
    [("seq", "1"), ("seq", 0), ("prev", b"short"), ("ts", 1.5), ("meter_wh", -1), ("data", []), ("seq", True)],
)
def test_wrong_types(field, value, signer, keyring):
    body = cbor2.loads(signer.sign("meter", "s", 1, meter_wh=3).encoded)
    body[field] = value
    with pytest.raises(MalformedEvent):
        decode_event(cbor2.dumps(body, canonical=True))


def test_unknown_field_is_refused(signer):
    body = cbor2.loads(signer.sign("meter", "s", 1, meter_wh=3).encoded)
    body["extra"] = 1
    with pytest.raises(MalformedEvent, match="unknown fields"):
        decode_event(cbor2.dumps(body, canonical=True))


# --- each signature checked once per process ----------------------------------------


def test_verify_event_remembers_a_checked_signature(signer, keyring):
    from crdt import EventCache

    cache = EventCache()
    event = signer.sign("start", "s", 1)
    first = verify_event(event.encoded, keyring, cache=cache)
    assert verify_event(bytes(event.encoded), keyring, cache=cache) is first
    assert (cache.verifications, cache.hits) == (1, 1)
    # Without a cache every call checks, and a forged signature over the same content fails.
    body = cbor2.loads(event.encoded)
    body["sig"] = bytes(64)
    with pytest.raises(BadSignature):
        verify_event(cbor2.dumps(body, canonical=True), keyring, cache=cache)
    assert verify_event(event.encoded, keyring, cache=None).record == event.record


def test_a_cached_event_still_needs_its_device_in_the_keyring(signer, keyring):
    from crdt import EventCache

    cache = EventCache()
    event = signer.sign("start", "s", 1)
    verify_event(event.encoded, keyring, cache=cache)
    with pytest.raises(UnknownKey):
        verify_event(event.encoded, Keyring(), cache=cache)
    other = Keyring({signer.device_id: make_signer("someone-else").public_key})
    with pytest.raises(BadSignature):
        verify_event(event.encoded, other, cache=cache)
