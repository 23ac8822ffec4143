"""The leader-to-cloud wire format: batched Automerge sync over HTTP(S).

    POST /v1/sync
    Content-Type: application/cbor
    Content-Encoding: deflate          (zlib stream, RFC 1950; the response likewise)

    request  {"node": str, "site": str, "msgs": {doc_id: bytes | null}, "reset": [doc_id, ...]}
    response {"msgs": {doc_id: bytes}, "errors": {doc_id: str}}

It is the mesh's `/m/sync` exchange with the cloud as one more peer: the cloud
keeps one Automerge sync state per (leader node id, document), `null` asks the
cloud to speak first about a document, `reset` says the leader started those
sync states afresh (after a failure or a leader change), and a message the cloud
refuses comes back in `errors` while the rest of the batch is applied. Because
Automerge sync is idempotent, a batch that is re-sent, or sent by two leaders at
once, changes nothing the second time: this is what makes forwarding safe with
more than one leader.

Compression: the body is deflated; decompression is bounded (`MAX_INFLATED`),
so a small hostile body cannot expand into gigabytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

SYNC_PATH = "/v1/sync"
CONTENT_TYPE = "application/cbor"
CONTENT_ENCODING = "deflate"
MAX_BATCH_BYTES = 256 * 1024
"""Largest request body the forwarder builds, before compression (DESIGN.md default)."""
MAX_INFLATED = 16 * 1024 * 1024
"""Largest decompressed body either side accepts."""
MAX_DOCS = 1024
MAX_ID = 128


class WireError(ValueError):
    """A body is not a valid cloud sync message; the message says what is wrong."""


def compress(data: bytes) -> bytes:
    return zlib.compress(data, 6)


def decompress(data: bytes, limit: int = MAX_INFLATED) -> bytes:
    """Inflate a zlib body, refusing anything that grows beyond `limit` bytes."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise WireError(f"body is not a deflate (zlib) stream: {exc}") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise WireError(f"body inflates to more than {limit} bytes")
    if not inflater.eof:
        raise WireError("body is a truncated deflate stream")
    return out


def _load_map(data: bytes, what: str) -> dict[Any, Any]:
    try:
        obj = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several error types on bad input
        raise WireError(f"{what} is not valid CBOR: {exc}") from exc
    if not isinstance(obj, dict):
        raise WireError(f"{what} must be a CBOR map")
    return obj


def _ident(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID or not value.isprintable():
        raise WireError(f"{what} must be a printable string of 1 to {MAX_ID} characters")
    return value


def _msgs(value: Any, what: str, *, allow_null: bool) -> dict[str, bytes | None]:
    if not isinstance(value, dict) or len(value) > MAX_DOCS:
        raise WireError(f"{what}: msgs must be a map of at most {MAX_DOCS} documents")
    out: dict[str, bytes | None] = {}
    for doc_id, msg in value.items():
        doc_id = _ident(doc_id, f"{what} document id")
        if msg is None and allow_null:
            out[doc_id] = None
        elif isinstance(msg, bytes) and msg:
            out[doc_id] = msg
        else:
            raise WireError(f"{what}: message for {doc_id!r} must be non-empty bytes")
    return out


@dataclass(frozen=True)
class CloudSyncRequest:
    node_id: str
    site: str
    msgs: Mapping[str, bytes | None]
    reset: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return cbor2.dumps(
            {"node": self.node_id, "site": self.site, "msgs": dict(self.msgs), "reset": list(self.reset)},
            canonical=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> CloudSyncRequest:
        obj = _load_map(data, "sync request")
        for key in ("node", "site", "msgs"):
            if key not in obj:
                raise WireError(f"sync request has no {key!r} field")
        reset = obj.get("reset", [])
        if not isinstance(reset, list) or len(reset) > MAX_DOCS:
            raise WireError("sync request: reset must be a list of document ids")
        return cls(
            _ident(obj["node"], "node"),
            _ident(obj["site"], "site"),
            _msgs(obj["msgs"], "sync request", allow_null=True),
            tuple(_ident(d, "reset document id") for d in reset),
        )


@dataclass(frozen=True)
class CloudSyncResponse:
    msgs: Mapping[str, bytes]
    errors: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return cbor2.dumps({"msgs": dict(self.msgs), "errors": dict(self.errors)}, canonical=True)

    @classmethod
    def decode(cls, data: bytes) -> CloudSyncResponse:
        obj = _load_map(data, "sync response")
        if "msgs" not in obj:
            raise WireError("sync response has no 'msgs' field")
        msgs = _msgs(obj["msgs"], "sync response", allow_null=False)
        errors = obj.get("errors", {})
        if not isinstance(errors, dict) or not all(isinstance(v, str) for v in errors.values()):
            raise WireError("sync response: errors must map document ids to text")
        return cls(
            {k: v for k, v in msgs.items() if v is not None},
            {_ident(k, "error document id"): v for k, v in errors.items()},
        )


# --- receipts ------------------------------------------------------------------------

RECEIPT_FIELDS = ("session_id", "energy_wh", "cost_cents", "currency", "heads", "issued_ts", "issuer")


def receipt_body(receipt: Mapping[str, Any]) -> bytes:
    """The canonical bytes a receipt's signature covers (every field but `sig`)."""
    return cbor2.dumps({k: receipt[k] for k in RECEIPT_FIELDS}, canonical=True)
