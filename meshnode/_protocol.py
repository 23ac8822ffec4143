"""The mesh wire protocol: CBOR messages of the CoAP resources, parsed strictly.

Every payload between nodes is a CBOR map (content-format 60). This module turns
bytes into frozen dataclasses and back; it does no I/O and decides nothing. A
payload that does not parse raises `ProtocolError` (a `BadRequest`, answered with
4.00 by the transport) before any state is touched. docs/protocol.md describes
each message for a second implementation.

Resources (RFC 7252 section 5.7 for the methods, RFC 6690 for /.well-known/core):

    GET  /m/hello     -> Hello
    POST /m/members   MembersRequest -> MembersResponse
    POST /m/digest    DigestRequest  -> DigestResponse
    POST /m/sync      SyncRequest    -> SyncResponse
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from crdt import DEFAULT_BUCKETS

from ._membership import MemberRecord, MembershipError
from ._transport import BadRequest

PROTOCOL_VERSION = 1
MAX_ID_LEN = 128
MAX_DOCS_PER_SYNC = 512
MAX_RECORDS = 1024
MAX_SYNC_MESSAGE = 2 * 1024 * 1024


class ProtocolError(BadRequest):
    """A peer's payload is not a valid protocol message (answered with 4.00)."""


def encode(obj: Mapping[str, Any]) -> bytes:
    # Not canonical: nothing signs these bytes as a map (sealing signs the bytes
    # as they are), and sorting every member record's keys made encoding 3.5x
    # slower, which large meshes felt. Key order is the sender's, fixed by the code.
    return cbor2.dumps(obj)


def _decode_map(payload: bytes, what: str) -> dict[Any, Any]:
    try:
        obj = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several error types for bad input
        raise ProtocolError(f"{what}: payload is not valid CBOR ({exc})") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a CBOR map, got {type(obj).__name__}")
    return obj


def _id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LEN or not value.isprintable():
        raise ProtocolError(f"{what} must be a printable string of 1 to {MAX_ID_LEN} characters")
    return value


def _field(obj: Mapping[Any, Any], key: str, what: str) -> Any:
    if key not in obj:
        raise ProtocolError(f"{what}: missing field {key!r}")
    return obj[key]


# --- hello -------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """The node descriptor (GET /m/hello). Nothing in it is secret."""

    node_id: str
    address: str
    incarnation: int
    public_key: bytes
    site: str
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return encode(
            {"id": self.node_id, "v": self.version, "addr": self.address, "inc": self.incarnation,
             "key": self.public_key, "site": self.site}
        )

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        obj = _decode_map(payload, "hello")
        version = _field(obj, "v", "hello")
        incarnation = _field(obj, "inc", "hello")
        key = _field(obj, "key", "hello")
        if not isinstance(version, int) or not isinstance(incarnation, int) or incarnation < 0:
            raise ProtocolError("hello: v and inc must be non-negative integers")
        if not isinstance(key, bytes) or len(key) != 32:
            raise ProtocolError("hello: key must be 32 bytes")
        return cls(
            node_id=_id(_field(obj, "id", "hello"), "hello id"),
            address=_id(_field(obj, "addr", "hello"), "hello addr"),
            incarnation=incarnation,
            public_key=key,
            site=_id(_field(obj, "site", "hello"), "hello site"),
            version=version,
        )


# --- members -----------------------------------------------------------------------


def _records(value: Any, what: str) -> tuple[MemberRecord, ...]:
    if not isinstance(value, list) or len(value) > MAX_RECORDS:
        raise ProtocolError(f"{what}: records must be a list of at most {MAX_RECORDS}")
    try:
        return tuple(MemberRecord.from_wire(r) for r in value)
    except MembershipError as exc:
        raise ProtocolError(f"{what}: bad member record: {exc}") from exc


@dataclass(frozen=True)
class MembersRequest:
    """Push our view of the membership; the response carries the peer's."""

    sender: str
    records: tuple[MemberRecord, ...]

    def encode(self) -> bytes:
        return encode({"from": self.sender, "records": [r.to_wire() for r in self.records]})

    @classmethod
    def decode(cls, payload: bytes) -> MembersRequest:
        obj = _decode_map(payload, "members")
        return cls(_id(_field(obj, "from", "members"), "members from"), _records(_field(obj, "records", "members"), "members"))


@dataclass(frozen=True)
class MembersResponse:
    records: tuple[MemberRecord, ...]

    def encode(self) -> bytes:
        return encode({"records": [r.to_wire() for r in self.records]})

    @classmethod
    def decode(cls, payload: bytes) -> MembersResponse:
        obj = _decode_map(payload, "members response")
        return cls(_records(_field(obj, "records", "members response"), "members response"))


# --- digest ------------------------------------------------------------------------


@dataclass(frozen=True)
class DigestRequest:
    """Our bucket summaries; the peer answers with its entries of the buckets that differ."""

    sender: str
    buckets: tuple[bytes, ...]

    def encode(self) -> bytes:
        return encode({"from": self.sender, "buckets": list(self.buckets)})

    @classmethod
    def decode(cls, payload: bytes) -> DigestRequest:
        obj = _decode_map(payload, "digest")
        buckets = _field(obj, "buckets", "digest")
        if (
            not isinstance(buckets, list)
            or len(buckets) != DEFAULT_BUCKETS
            or not all(isinstance(b, bytes) and len(b) == 8 for b in buckets)
        ):
            raise ProtocolError(f"digest: buckets must be a list of {DEFAULT_BUCKETS} 8-byte strings")
        return cls(_id(_field(obj, "from", "digest"), "digest from"), tuple(buckets))


def _entries(value: Any, what: str) -> dict[str, bytes]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: entries must be a map")
    out = {}
    for doc_id, hh in value.items():
        if not isinstance(hh, bytes) or len(hh) != 8:
            raise ProtocolError(f"{what}: each entry is an 8-byte heads hash")
        out[_id(doc_id, f"{what} document id")] = hh
    return out


@dataclass(frozen=True)
class DigestResponse:
    buckets: tuple[int, ...]
    entries: Mapping[str, bytes] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode({"buckets": list(self.buckets), "entries": dict(self.entries)})

    @classmethod
    def decode(cls, payload: bytes) -> DigestResponse:
        obj = _decode_map(payload, "digest response")
        buckets = _field(obj, "buckets", "digest response")
        if not isinstance(buckets, list) or not all(
            isinstance(b, int) and 0 <= b < DEFAULT_BUCKETS for b in buckets
        ):
            raise ProtocolError("digest response: buckets must be bucket indexes")
        return cls(tuple(buckets), _entries(_field(obj, "entries", "digest response"), "digest response"))


# --- sync --------------------------------------------------------------------------


def _messages(value: Any, what: str, *, allow_null: bool) -> dict[str, bytes | None]:
    if not isinstance(value, dict) or len(value) > MAX_DOCS_PER_SYNC:
        raise ProtocolError(f"{what}: msgs must be a map of at most {MAX_DOCS_PER_SYNC} documents")
    out: dict[str, bytes | None] = {}
    for doc_id, msg in value.items():
        doc_id = _id(doc_id, f"{what} document id")
        if msg is None and allow_null:
            out[doc_id] = None
        elif isinstance(msg, bytes) and 0 < len(msg) <= MAX_SYNC_MESSAGE:
            out[doc_id] = msg
        else:
            raise ProtocolError(f"{what}: message for {doc_id!r} must be non-empty bytes")
    return out


@dataclass(frozen=True)
class SyncRequest:
    """Automerge sync messages for several documents in one request.

    `msgs[doc] = None` asks the peer to speak first about a document (we have
    nothing to say yet). `reset` lists documents whose sync state we started
    afresh, so the peer must drop its state for us too.
    """

    sender: str
    msgs: Mapping[str, bytes | None]
    reset: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return encode({"from": self.sender, "msgs": dict(self.msgs), "reset": list(self.reset)})

    @classmethod
    def decode(cls, payload: bytes) -> SyncRequest:
        obj = _decode_map(payload, "sync")
        reset = obj.get("reset", [])
        if not isinstance(reset, list) or len(reset) > MAX_DOCS_PER_SYNC:
            raise ProtocolError("sync: reset must be a list of document ids")
        return cls(
            _id(_field(obj, "from", "sync"), "sync from"),
            _messages(_field(obj, "msgs", "sync"), "sync", allow_null=True),
            tuple(_id(d, "sync reset document id") for d in reset),
        )


@dataclass(frozen=True)
class SyncResponse:
    """The peer's replies, and per-document errors for messages it refused."""

    msgs: Mapping[str, bytes]
    errors: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode({"msgs": dict(self.msgs), "errors": dict(self.errors)})

    @classmethod
    def decode(cls, payload: bytes) -> SyncResponse:
        obj = _decode_map(payload, "sync response")
        msgs = _messages(_field(obj, "msgs", "sync response"), "sync response", allow_null=False)
        errors = obj.get("errors", {})
        if not isinstance(errors, dict) or not all(isinstance(v, str) for v in errors.values()):
            raise ProtocolError("sync response: errors must map document ids to text")
        return cls({k: v for k, v in msgs.items() if v is not None}, {_id(k, "error id"): v for k, v in errors.items()})
