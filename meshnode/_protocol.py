"""The mesh wire protocol: CBOR messages of the CoAP resources, parsed strictly.

Every payload between nodes is a CBOR map (content-format 60). This module turns
bytes into frozen dataclasses and back; it does no I/O and decides nothing. A
payload that does not parse raises `ProtocolError` (a `BadRequest`, answered with
4.00 by the transport) before any state is touched. docs/protocol.md describes
each message for a second implementation.

Resources (RFC 7252 section 5.7 for the methods, RFC 6690 for /.well-known/core):

    GET  /m/hello     -> Hello                      (anyone: who is this?)
    POST /m/hello     Hello -> Hello                (introduction both ways)
    POST /m/push      Push, one way                 (NON + No-Response, RFC 7967)
    POST /m/state     StateRequest  -> StateResponse (heads-hash + membership digest)
    POST /m/digest    DigestRequest -> DigestResponse
    POST /m/sync      SyncRequest   -> SyncResponse

Version 2 replaced version 1's per-change request/response pushes and its
/m/members exchange of full member lists: membership now travels as records
piggybacked on pushes and state exchanges (see docs/protocol.md). Version 3
adds a member record's status (`st`: a suspicion or a death notice, for the SWIM
failure detector), which a version 2 node would read as a record of life. Version 4
makes SWIM the default detector and adds the record's links (`nb`, docs/membership.md
R12), without which a version 4 node holds a version 3 one unreachable. A hello
names its sender's failure detector (`det`); a node refuses, with 4.09, the hello of
a node that runs another (`DetectorMismatch`): the two detectors read each other's
records wrongly, so a mixed mesh must not form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from crdt import DEFAULT_BUCKETS

from ._membership import DIGEST_SIZE, MemberRecord, MembershipError
from ._transport import BadRequest, RequestRefused

PROTOCOL_VERSION = 4
MAX_ID_LEN = 128
MAX_DETECTOR_LEN = 32
MAX_DOCS_PER_SYNC = 512
"""Hard limit on documents in one message (parsing); batches are cut by bytes first."""
MAX_BATCH_BYTES = 256 * 1024
"""A sync batch or push stops taking documents past this many bytes of messages."""
MAX_HEADS = 64
MAX_TARGETS = 256
MAX_RECORDS = 1024
MAX_SYNC_MESSAGE = 2 * 1024 * 1024


class ProtocolError(BadRequest):
    """A peer's payload is not a valid protocol message (answered with 4.00)."""


class DetectorMismatch(RequestRefused):
    """4.09 Conflict: the hello's sender runs another failure detector than we do.

    The heartbeat detector reads a SWIM node's record (no heartbeats) as a node that
    stopped beating, and SWIM reads a heartbeat node's record (no links) as a member
    no path reaches: each side would hold the other dead and elect its own leader.
    The message names both nodes and their detectors, for the operator."""

    code = "4.09"
    message = "mixed failure detectors"


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
    detector: str | None = None
    """The sender's failure detector ("swim", "heartbeat"; wire `det`); None when it does
    not say (an older version 4 node), which no check refuses."""

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "id": self.node_id,
            "v": self.version,
            "addr": self.address,
            "inc": self.incarnation,
            "key": self.public_key,
            "site": self.site,
        }
        if self.detector is not None:
            obj["det"] = self.detector
        return encode(obj)

    def check_detector(self, node_id: str, detector: str) -> None:
        """Refuse a node that runs another failure detector than ``detector`` (ours).

        Raises:
            DetectorMismatch: it says it runs another one; the message names both nodes.
        """
        if self.detector is not None and self.detector != detector:
            raise DetectorMismatch(
                f"mixed failure detectors: node {self.node_id!r} runs {self.detector!r}, node {node_id!r} runs"
                f" {detector!r}; every node of a site must run the same one (the node's `detector` setting)"
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
        detector = obj.get("det")
        if detector is not None and (
            not isinstance(detector, str)
            or not 0 < len(detector) <= MAX_DETECTOR_LEN
            or not (detector.isascii() and detector.isidentifier())
        ):
            raise ProtocolError(f"hello: det must be a detector name of 1 to {MAX_DETECTOR_LEN} letters")
        return cls(
            node_id=_id(_field(obj, "id", "hello"), "hello id"),
            address=_id(_field(obj, "addr", "hello"), "hello addr"),
            incarnation=incarnation,
            public_key=key,
            site=_id(_field(obj, "site", "hello"), "hello site"),
            version=version,
            detector=detector,
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
class Push:
    """One-way: the changes the receiver lacks, and piggybacked membership.

    `docs[doc] = (heads, message)`: our heads after the changes, and an Automerge
    sync message carrying them (`meshnode.core.change_message`). `targets` lists
    the peers the sender pushes to itself, so a receiver need not relay to them;
    None when the sender does not say.
    """

    sender: str
    incarnation: int
    docs: Mapping[str, tuple[tuple[bytes, ...], bytes]]
    records: tuple[MemberRecord, ...] = ()
    targets: tuple[str, ...] | None = None

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "from": self.sender,
            "inc": self.incarnation,
            "docs": {d: [list(h), m] for d, (h, m) in self.docs.items()},
            "records": [r.to_wire() for r in self.records],
        }
        if self.targets is not None:
            obj["to"] = list(self.targets)
        return encode(obj)

    @classmethod
    def decode(cls, payload: bytes) -> Push:
        obj = _decode_map(payload, "push")
        inc = _field(obj, "inc", "push")
        if not isinstance(inc, int) or isinstance(inc, bool) or inc < 0:
            raise ProtocolError("push: inc must be a non-negative integer")
        docs = _field(obj, "docs", "push")
        if not isinstance(docs, dict) or len(docs) > MAX_DOCS_PER_SYNC:
            raise ProtocolError(f"push: docs must be a map of at most {MAX_DOCS_PER_SYNC} documents")
        out: dict[str, tuple[tuple[bytes, ...], bytes]] = {}
        for d, entry in docs.items():
            d = _id(d, "push document id")
            if not isinstance(entry, list) or len(entry) != 2:
                raise ProtocolError(f"push: entry for {d!r} must be [heads, message]")
            heads, msg = entry
            if (
                not isinstance(heads, list)
                or len(heads) > MAX_HEADS
                or not all(isinstance(h, bytes) and len(h) == 32 for h in heads)
            ):
                raise ProtocolError(f"push: heads for {d!r} must be a list of 32-byte hashes")
            if not isinstance(msg, bytes) or not 0 < len(msg) <= MAX_SYNC_MESSAGE:
                raise ProtocolError(f"push: message for {d!r} must be non-empty bytes")
            out[d] = (tuple(heads), msg)
        targets = obj.get("to")
        if targets is not None:
            if not isinstance(targets, list) or len(targets) > MAX_TARGETS:
                raise ProtocolError(f"push: to must be a list of at most {MAX_TARGETS} ids")
            targets = tuple(_id(t, "push target") for t in targets)
        return cls(
            _id(_field(obj, "from", "push"), "push from"), inc, out, _records(obj.get("records", []), "push"), targets
        )


def _hash(value: Any, what: str, size: int = 8) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise ProtocolError(f"{what} must be {size} bytes")
    return value


@dataclass(frozen=True)
class StateRequest:
    """The idle exchange: a hash of all our documents' heads (8 bytes) and a digest
    of our membership view (`Membership.digest`, 12 bytes), with piggybacked records."""

    sender: str
    heads_hash: bytes
    members_digest: bytes
    records: tuple[MemberRecord, ...] = ()

    def encode(self) -> bytes:
        return encode(
            {
                "from": self.sender,
                "hh": self.heads_hash,
                "md": self.members_digest,
                "records": [r.to_wire() for r in self.records],
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> StateRequest:
        obj = _decode_map(payload, "state")
        return cls(
            _id(_field(obj, "from", "state"), "state from"),
            _hash(_field(obj, "hh", "state"), "state hh"),
            _hash(_field(obj, "md", "state"), "state md", DIGEST_SIZE),
            _records(obj.get("records", []), "state"),
        )


@dataclass(frozen=True)
class StateResponse:
    """The peer's hashes, and records: piggybacked ones, or its whole live view
    when the membership digests differ."""

    heads_hash: bytes
    members_digest: bytes
    records: tuple[MemberRecord, ...] = ()

    def encode(self) -> bytes:
        return encode(
            {"hh": self.heads_hash, "md": self.members_digest, "records": [r.to_wire() for r in self.records]}
        )

    @classmethod
    def decode(cls, payload: bytes) -> StateResponse:
        obj = _decode_map(payload, "state response")
        return cls(
            _hash(_field(obj, "hh", "state response"), "state response hh"),
            _hash(_field(obj, "md", "state response"), "state response md", DIGEST_SIZE),
            _records(obj.get("records", []), "state response"),
        )


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
        if not isinstance(buckets, list) or not all(isinstance(b, int) and 0 <= b < DEFAULT_BUCKETS for b in buckets):
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
    ttl_ms: int | None = None
    """How long the requester waits for this answer: the server abandons the work after it."""

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"from": self.sender, "msgs": dict(self.msgs), "reset": list(self.reset)}
        if self.ttl_ms is not None:
            obj["ttl"] = self.ttl_ms
        return encode(obj)

    @classmethod
    def decode(cls, payload: bytes) -> SyncRequest:
        obj = _decode_map(payload, "sync")
        reset = obj.get("reset", [])
        if not isinstance(reset, list) or len(reset) > MAX_DOCS_PER_SYNC:
            raise ProtocolError("sync: reset must be a list of document ids")
        ttl = obj.get("ttl")
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 < ttl <= 600_000):
            raise ProtocolError("sync: ttl must be 1 to 600000 milliseconds")
        return cls(
            _id(_field(obj, "from", "sync"), "sync from"),
            _messages(_field(obj, "msgs", "sync"), "sync", allow_null=True),
            tuple(_id(d, "sync reset document id") for d in reset),
            ttl,
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
