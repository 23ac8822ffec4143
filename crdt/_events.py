"""Signed charging events: the tamper-evident records inside session documents.

An event is a flat CBOR map (RFC 8949, deterministic encoding, section 4.2)::

    {event_id, type, device_id, session_id, seq, prev, ts, meter_wh, data, sig}

`sig` is an Ed25519 signature (pynacl) by the device's key over the canonical
CBOR encoding of the other nine fields. The design choices, and why:

- `event_id` is derived from the content (the first 16 bytes of SHA-256 over the
  canonical encoding of the record without `event_id` and `sig`, in hex). Session
  documents key their `events` map by it, so adding the same event twice changes
  nothing, and two *different* events can never land on the same key, where
  Automerge would keep one and hide the other. A fork (same device and `seq`,
  different content) is therefore visible to the fold, which reports it.
- `seq` counts the device's events from 1 and `prev` is the chain hash (SHA-256 of
  the canonical record including `event_id`, without `sig`) of the device's
  previous event, 32 zero bytes for the first. A device's events span several
  session documents; a chain link is checked wherever both ends are present (in
  a document for consecutive events of one session, in the cloud for all).
- `meter_wh` is the cumulative energy register, so a lost reading loses no energy.
- Time is passed in (`ts`, milliseconds since the epoch): this package reads no clock.
- Each event's signature is checked once per process (`EventCache`): a session is
  folded again after every change, and without the cache every fold re-verified
  every event of the session (issue 9: 127k Ed25519 checks for 19.8k re-reads).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2
import nacl.exceptions
import nacl.signing

from ._errors import (
    BadSignature,
    BrokenChain,
    LocalError,
    MalformedEvent,
    MissingField,
    UnknownKey,
)

GENESIS_PREV = bytes(32)
"""`prev` of a device's first event."""

MAX_EVENT_BYTES = 16 * 1024
"""Largest encoded event accepted; larger input is refused as malformed."""

FIELDS = ("event_id", "type", "device_id", "session_id", "seq", "prev", "ts", "meter_wh", "data")

_MAX_TEXT = 256


@dataclass(frozen=True)
class EventRecord:
    """The signed content of an event (everything but the signature)."""

    event_id: str
    type: str
    device_id: str
    session_id: str
    seq: int
    prev: bytes
    ts: int
    meter_wh: int | None
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_map(self) -> dict[str, Any]:
        return {name: (dict(self.data) if name == "data" else getattr(self, name)) for name in FIELDS}


@dataclass(frozen=True)
class SignedEvent:
    """A verified (or freshly signed) event with its wire bytes.

    Attributes:
        record: the signed content.
        signature: 64-byte Ed25519 signature.
        encoded: the CBOR bytes as stored in documents and sent on the wire.
        chain_hash: what the device's next event carries as `prev`.
    """

    record: EventRecord
    signature: bytes
    encoded: bytes
    chain_hash: bytes

    @property
    def event_id(self) -> str:
        return self.record.event_id


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _content_id(body: Mapping[str, Any]) -> str:
    without_id = {k: v for k, v in body.items() if k != "event_id"}
    return hashlib.sha256(_canonical(without_id)).digest()[:16].hex()


class Keyring:
    """Which device holds which Ed25519 public key.

    The mapping is the trust decision: an event verifies only if its device is
    here. Enrolment (certificates signed by a site key) fills it in later work;
    for now the caller adds keys it trusts.
    """

    def __init__(self, keys: Mapping[str, bytes] | None = None) -> None:
        self._keys: dict[str, nacl.signing.VerifyKey] = {}
        for device_id, public_key in (keys or {}).items():
            self.add(device_id, public_key)

    def add(self, device_id: str, public_key: bytes) -> None:
        if len(public_key) != 32:
            raise LocalError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
        self._keys[device_id] = nacl.signing.VerifyKey(public_key)

    def get(self, device_id: str) -> nacl.signing.VerifyKey | None:
        return self._keys.get(device_id)

    def public_key(self, device_id: str) -> bytes | None:
        """The device's raw 32-byte key, or None."""
        key = self._keys.get(device_id)
        return None if key is None else key.encode()

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._keys

    def public_keys(self) -> dict[str, bytes]:
        return {d: bytes(k) for d, k in sorted(self._keys.items())}


class EventSigner:
    """Signs a device's events and keeps its chain head (`seq`, `prev`).

    Not thread-safe; the node signs events one at a time. Use `resume` after a
    restart so the chain continues from the last event that was stored.
    """

    def __init__(
        self,
        device_id: str,
        signing_key: nacl.signing.SigningKey,
        *,
        seq: int = 0,
        prev: bytes = GENESIS_PREV,
    ) -> None:
        if not device_id or len(device_id) > _MAX_TEXT:
            raise LocalError("device_id must be a non-empty string of at most 256 characters")
        self.device_id = device_id
        self.signing_key = signing_key
        self.seq = seq
        self.prev = prev

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @classmethod
    def resume(cls, device_id: str, signing_key: nacl.signing.SigningKey, events: Iterable[SignedEvent]) -> EventSigner:
        """A signer whose chain continues after the highest-`seq` event of this device."""
        last: SignedEvent | None = None
        for event in events:
            if event.record.device_id == device_id and (last is None or event.record.seq > last.record.seq):
                last = event
        if last is None:
            return cls(device_id, signing_key)
        return cls(device_id, signing_key, seq=last.record.seq, prev=last.chain_hash)

    def sign(
        self,
        type: str,
        session_id: str,
        ts: int,
        *,
        meter_wh: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> SignedEvent:
        """Sign the device's next event and advance the chain head."""
        body: dict[str, Any] = {
            "type": type,
            "device_id": self.device_id,
            "session_id": session_id,
            "seq": self.seq + 1,
            "prev": self.prev,
            "ts": ts,
            "meter_wh": meter_wh,
            "data": dict(data or {}),
        }
        body["event_id"] = _content_id(body)
        signed = _finish(body, self.signing_key)
        self.seq += 1
        self.prev = signed.chain_hash
        return signed


def _finish(body: dict[str, Any], signing_key: nacl.signing.SigningKey) -> SignedEvent:
    content = _canonical(body)
    signature = signing_key.sign(content).signature
    record = _record_from(body)
    encoded = _canonical({**body, "sig": signature})
    return SignedEvent(record, signature, encoded, hashlib.sha256(content).digest())


def _record_from(body: Mapping[str, Any]) -> EventRecord:
    return EventRecord(**{name: body[name] for name in FIELDS})


_TYPES: dict[str, tuple[type, ...]] = {
    "event_id": (str,),
    "type": (str,),
    "device_id": (str,),
    "session_id": (str,),
    "seq": (int,),
    "prev": (bytes,),
    "ts": (int,),
    "meter_wh": (int, type(None)),
    "data": (dict,),
}


def decode_event(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """Parse an event's bytes into (body, signature), checking shape only.

    Raises:
        MalformedEvent: not CBOR, not a map, extra keys, wrong types or sizes.
        MissingField: a required field is absent.
    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise MalformedEvent(f"an event is bytes, got {type(blob).__name__}")
    if len(blob) > MAX_EVENT_BYTES:
        raise MalformedEvent(f"event is {len(blob)} bytes, more than the {MAX_EVENT_BYTES} allowed")
    try:
        obj = cbor2.loads(bytes(blob))
    except Exception as exc:  # cbor2 raises several types, including ValueError and its own
        raise MalformedEvent(f"event is not valid CBOR: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedEvent(f"an event is a CBOR map, got {type(obj).__name__}")
    event_id = obj.get("event_id") if isinstance(obj.get("event_id"), str) else None
    for name in (*FIELDS, "sig"):
        if name not in obj:
            raise MissingField(f"event has no {name!r} field", event_id=event_id)
    extra = sorted(str(k) for k in obj if k not in FIELDS and k != "sig")
    if extra:
        raise MalformedEvent(f"event has unknown fields {extra}", event_id=event_id)
    for name, types in _TYPES.items():
        value = obj[name]
        if not isinstance(value, types) or isinstance(value, bool):
            raise MalformedEvent(f"event field {name!r} has type {type(value).__name__}", event_id=event_id)
    for name in ("event_id", "type", "device_id", "session_id"):
        if not obj[name] or len(obj[name]) > _MAX_TEXT:
            raise MalformedEvent(f"event field {name!r} is empty or too long", event_id=event_id)
    if obj["seq"] < 1 or len(obj["prev"]) != 32:
        raise MalformedEvent("event seq must be >= 1 and prev 32 bytes", event_id=event_id)
    if obj["meter_wh"] is not None and obj["meter_wh"] < 0:
        raise MalformedEvent("event meter_wh must not be negative", event_id=event_id)
    signature = obj.pop("sig")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise MalformedEvent("event signature must be 64 bytes", event_id=event_id)
    if _content_id(obj) != obj["event_id"]:
        raise MalformedEvent("event_id does not match the event's content", event_id=event_id)
    return obj, signature


_Entry = tuple[SignedEvent, bytes, set[bytes], set[bytes]]
"""A cached event: (parsed event, its signed bytes, keys it verified under, keys it failed under)."""


class EventCache:
    """Events already parsed and signatures already checked, so each is done once per process.

    Keyed by the event's bytes (its id, its content and its signature together) and,
    for the signature check, the device's public key: a blob whose signature was
    checked under a key is not checked again under that key, whether it passed or
    failed. A different signature over the same content is different bytes, so it
    is checked on its own. `parse` alone (shape and content id, no signature) is
    remembered too, so a caller that only needs to know who signed an event (the
    cloud, before it knows which keys to trust) does not decode it a second time.
    Entries are evicted oldest-used first beyond `max_entries`; `max_entries=0`
    keeps nothing (every call verifies: the cost before the cache, for
    benchmarks). Thread-safe: the cloud folds in worker threads.

    Attributes:
        verifications: Ed25519 checks done through this cache.
        hits: checks answered from the cache.
        parses: events decoded through this cache (each blob once while it is kept).
    """

    def __init__(self, max_entries: int = 16384) -> None:
        self.max_entries = max_entries
        self.verifications = 0
        self.hits = 0
        self.parses = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _entry(self, blob: bytes) -> _Entry:
        with self._lock:
            entry = self._entries.get(blob)
            if entry is not None:
                self._entries.move_to_end(blob)
                return entry
        self.parses += 1
        event, content = _parse(blob)
        entry = (event, content, set(), set())
        self._remember(blob, entry)
        return entry

    def parse(self, blob: bytes) -> SignedEvent:
        """The event in `blob`, shape and content id checked, its signature NOT checked.

        Raises:
            MalformedEvent, MissingField: as `decode_event`.
        """
        return self._entry(bytes(blob))[0]

    def verify(self, blob: bytes, keyring: Keyring) -> SignedEvent:
        """`verify_event` without the chain check, remembering the outcome."""
        event, content, good, bad = self._entry(bytes(blob))
        public_key = keyring.public_key(event.record.device_id)
        if public_key is None:
            raise UnknownKey(f"device {event.record.device_id!r} is not in the keyring", event_id=event.event_id)
        if public_key in good:
            self.hits += 1
            return event
        if public_key not in bad:
            self.verifications += 1
            try:
                nacl.signing.VerifyKey(public_key).verify(content, event.signature)
            except nacl.exceptions.BadSignatureError:
                bad.add(public_key)
            else:
                good.add(public_key)
        else:
            self.hits += 1
        if public_key in bad:
            raise BadSignature(
                f"signature of event {event.event_id} does not match device {event.record.device_id!r}",
                event_id=event.event_id,
            )
        return event

    def _remember(self, blob: bytes, entry: _Entry) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._entries[blob] = entry
            self._entries.move_to_end(blob)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


EVENT_CACHE = EventCache()
"""The process's cache (see `EventCache`); `verify_event` and the fold use it by default."""


def _parse(blob: bytes) -> tuple[SignedEvent, bytes]:
    """Shape and content-id checks, no signature check; also the signed bytes (the
    canonical record, which the chain hash covers too), so they are encoded once."""
    body, signature = decode_event(blob)
    content = _canonical(body)
    return SignedEvent(_record_from(body), signature, blob, hashlib.sha256(content).digest()), content


def verify_event(
    blob: bytes,
    keyring: Keyring,
    *,
    previous: SignedEvent | None = None,
    cache: EventCache | None = EVENT_CACHE,
) -> SignedEvent:
    """Verify an event's bytes and return it.

    Args:
        blob: the event's CBOR bytes, from a document or the network.
        keyring: trusted device keys.
        previous: when given, the same device's event with `seq - 1`; the chain
            link between them is checked too.
        cache: where outcomes are remembered (default: the process's); None
            checks the signature afresh.

    Raises:
        MalformedEvent, MissingField: the bytes are not a well-formed event.
        UnknownKey: the device is not in the keyring.
        BadSignature: the signature does not verify.
        BrokenChain: `previous` was given and `prev`/`seq` do not follow it.
    """
    event = (cache if cache is not None else EventCache(max_entries=0)).verify(blob, keyring)
    if previous is not None:
        check_link(previous, event)
    return event


def check_link(previous: SignedEvent, event: SignedEvent) -> None:
    """Raise BrokenChain unless `event` directly follows `previous` in its device's chain."""
    rec = event.record
    if previous.record.device_id != rec.device_id:
        raise LocalError("check_link compares two events of the same device")
    if rec.seq != previous.record.seq + 1:
        raise BrokenChain(
            f"event {rec.event_id} has seq {rec.seq}, expected {previous.record.seq + 1}",
            event_id=rec.event_id,
        )
    if rec.prev != previous.chain_hash:
        raise BrokenChain(
            f"event {rec.event_id} (seq {rec.seq}) does not point at the hash of seq {previous.record.seq}",
            event_id=rec.event_id,
        )
