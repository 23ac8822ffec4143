"""Sync bookkeeping: per-peer Automerge sync states, and digests of document sets.

Two nodes find which documents differ in two steps, without sending every head:

1. Each sends a *digest*: the documents are split into `buckets` by a hash of their
   id, and each bucket is summarised by 8 bytes (SHA-256 over its sorted
   `(doc_id, heads hash)` pairs). 64 buckets are 512 bytes whatever the number of
   documents.
2. For the buckets whose summaries differ, they exchange the `(doc_id, heads
   hash)` entries, and run Automerge sync only for documents whose heads differ or
   that one side lacks.

Automerge's own sync protocol (bloom filters of changes, per peer) then moves only
the missing changes. Its `SyncState` cannot be serialised in this binding, so sync
states live in memory; after a restart they start fresh, which the protocol allows
(the first exchange costs a little more).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from automerge.core import Document, Message, SyncState

from ._errors import InvalidSyncMessage, LocalError

DEFAULT_BUCKETS = 64


def _is_engine_error(exc: BaseException) -> bool:
    """True for what the Automerge binding raises on bad input: an Exception, or a Rust panic.

    pyo3 reports a Rust panic as `pyo3_runtime.PanicException`, a BaseException
    that no module exports. It is recognised by name when one is caught, rather
    than provoked at import time to learn its type (a panic costs ~50 MB of RSS
    for the unwinder's tables, kept for the life of the process).
    """
    if isinstance(exc, Exception):
        return True
    kind = type(exc)
    return kind.__name__ == "PanicException" and kind.__module__ == "pyo3_runtime"


_EMPTY = bytes(8)


def heads_hash(heads: Iterable[bytes]) -> bytes:
    """8 bytes that change whenever a document's heads change."""
    h = hashlib.sha256()
    for head in sorted(heads):
        h.update(head)
    return h.digest()[:8]


def bucket_of(doc_id: str, buckets: int = DEFAULT_BUCKETS) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:4], "big") % buckets


def make_digest(doc_heads: Mapping[str, bytes], buckets: int = DEFAULT_BUCKETS) -> list[bytes]:
    """Summarise a set of documents.

    Args:
        doc_heads: doc_id -> heads_hash(heads) of every document to compare.
        buckets: number of buckets; both sides must use the same.
    Returns:
        One 8-byte summary per bucket (zeros for an empty bucket).
    """
    grouped: dict[int, list[tuple[str, bytes]]] = {}
    for doc_id, hh in doc_heads.items():
        grouped.setdefault(bucket_of(doc_id, buckets), []).append((doc_id, hh))
    out = [_EMPTY] * buckets
    for index, entries in grouped.items():
        h = hashlib.sha256()
        for doc_id, hh in sorted(entries):
            h.update(doc_id.encode() + b"\0" + hh)
        out[index] = h.digest()[:8]
    return out


def differing_buckets(mine: list[bytes], theirs: list[bytes]) -> list[int]:
    if len(mine) != len(theirs):
        raise LocalError("digests with different bucket counts cannot be compared")
    return [i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b]


def bucket_entries(
    doc_heads: Mapping[str, bytes], indexes: Iterable[int], buckets: int = DEFAULT_BUCKETS
) -> dict[str, bytes]:
    """The `(doc_id -> heads hash)` entries of the given buckets."""
    wanted = set(indexes)
    return {d: hh for d, hh in doc_heads.items() if bucket_of(d, buckets) in wanted}


def differing_docs(mine: Mapping[str, bytes], theirs: Mapping[str, bytes]) -> set[str]:
    """Documents whose heads differ, or that only one side has (within compared buckets)."""
    return {d for d in mine.keys() | theirs.keys() if mine.get(d) != theirs.get(d)}


@dataclass
class SyncBook:
    """One Automerge sync state per (peer, document)."""

    _states: dict[tuple[str, str], SyncState] = field(default_factory=dict)

    def state(self, peer: str, doc_id: str) -> SyncState:
        key = (peer, doc_id)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = SyncState()
        return state

    def reset(self, peer: str, doc_id: str) -> None:
        """Forget one state: after a refused message it may claim changes we do not hold."""
        self._states.pop((peer, doc_id), None)

    def forget_peer(self, peer: str) -> None:
        """Drop a peer's states (it restarted, or left): the next sync starts fresh."""
        for key in [k for k in self._states if k[0] == peer]:
            del self._states[key]

    def forget_doc(self, doc_id: str) -> None:
        for key in [k for k in self._states if k[1] == doc_id]:
            del self._states[key]

    def peers(self) -> set[str]:
        return {p for p, _ in self._states}


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def uleb(self) -> int:
        value = shift = 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise InvalidSyncMessage("sync message: truncated or overlong LEB128 number")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise InvalidSyncMessage("sync message: a field runs past the end")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def hashes(self) -> None:
        self.take(32 * self.uleb())


MAX_BLOOM_PROBES = 64


def _check_bloom(bloom: bytes) -> None:
    """Refuse Bloom filters that would crash or exhaust Automerge.

    Automerge accepts a filter with entries but zero bits per entry (its next
    `generate_sync_message` then panics) and any probe count (it allocates one
    vector per probe per change: 2**32 probes abort the process). Its own filters
    use 10 bits per entry and 7 probes.
    """
    if not bloom:
        return
    r = _Reader(bloom)
    entries, bits_per_entry, probes = r.uleb(), r.uleb(), r.uleb()
    if entries and (bits_per_entry == 0 or not 1 <= probes <= MAX_BLOOM_PROBES):
        raise InvalidSyncMessage(f"sync message: Bloom filter with {bits_per_entry} bits per entry and {probes} probes")
    if len(bloom) - r.pos != (entries * bits_per_entry + 7) // 8:
        raise InvalidSyncMessage("sync message: Bloom filter size does not match its entries")


def check_sync_message(data: bytes) -> int:
    """Check the parts of a sync message Automerge trusts too much; return its change count.

    Layout (automerge `sync.rs`): type byte 0x42 or 0x43, heads, need (each a
    LEB128 count of 32-byte hashes), a LEB128 count of `have` entries (last-sync
    hashes and a length-prefixed Bloom filter each), then a LEB128 count of
    length-prefixed changes. What follows is left to Automerge.
    """
    r = _Reader(data)
    kind = r.take(1)[0]
    if kind not in (0x42, 0x43):
        raise InvalidSyncMessage(f"sync message: unknown type byte 0x{kind:02x}")
    r.hashes()
    r.hashes()
    for _ in range(r.uleb()):
        r.hashes()
        _check_bloom(r.take(r.uleb()))
    changes = r.uleb()
    for _ in range(changes):
        r.take(r.uleb())
    return changes


def decode_sync_message(data: bytes) -> Message:
    """Parse a peer's sync message. Raises InvalidSyncMessage on bad bytes."""
    if not isinstance(data, bytes) or not data:
        raise InvalidSyncMessage("a sync message is non-empty bytes")
    check_sync_message(data)
    try:
        return Message.decode(data)
    except Exception as exc:  # the binding raises plain Exception for parse errors
        raise InvalidSyncMessage(f"not an Automerge sync message: {exc}") from exc


def root_changes(doc: Document) -> int:
    """How many changes of `doc` have no dependencies (a sound document has one)."""
    return sum(1 for c in doc.get_changes([]) if not c.deps)


Validator = Callable[[Document], None]


class Replica:
    """A set of Automerge documents with per-peer sync states, in memory.

    It decides nothing about *when* to sync or *with whom*; it turns sync messages
    into new changes (returned so the caller can store them durably before it
    acknowledges anything) and produces the next message for a peer.

    Args:
        change_bytes: False for a holder that persists whole documents, never their
            changes (the cloud): `receive` then returns each new change with its hash
            and *empty* bytes. Encoding every change of a new document costs more
            than Automerge applying it; a holder that only needs to know which
            documents changed skips it.
    """

    def __init__(self, docs: Mapping[str, Document] | None = None, *, change_bytes: bool = True) -> None:
        self.docs: dict[str, Document] = dict(docs or {})
        self.book = SyncBook()
        self.change_bytes = change_bytes
        # Documents we are receiving for the first time, not yet adopted.
        self._incoming: dict[str, Document] = {}

    def heads_hashes(self, doc_ids: Iterable[str] | None = None) -> dict[str, bytes]:
        ids = self.docs.keys() if doc_ids is None else doc_ids
        return {d: heads_hash(self.docs[d].get_heads()) for d in ids if d in self.docs}

    def add(self, doc_id: str, doc: Document) -> list[tuple[bytes, bytes]]:
        """Adopt a locally created document; returns its changes (hash, bytes) to store."""
        if doc_id in self.docs:
            raise LocalError(f"document {doc_id!r} already exists")
        self.docs[doc_id] = doc
        return [(c.hash, c.bytes) for c in doc.get_changes([])]

    def changes_since(self, doc_id: str, heads: list[bytes]) -> list[tuple[bytes, bytes]]:
        return [(c.hash, c.bytes) for c in self.docs[doc_id].get_changes(heads)]

    def generate(self, peer: str, doc_id: str) -> bytes | None:
        """The next sync message for `peer` about `doc_id`, or None when nothing is to say."""
        # A document we lack is asked for with an empty one: the peer sends everything.
        doc = self.docs.get(doc_id)
        if doc is None:
            doc = Document()
        try:
            msg = doc.generate_sync_message(self.book.state(peer, doc_id))
        except BaseException as exc:
            if not _is_engine_error(exc):
                raise
            # A state poisoned by a peer's message must not take the node down.
            self.book.reset(peer, doc_id)
            msg = doc.generate_sync_message(self.book.state(peer, doc_id))
        return msg.encode() if msg is not None else None

    def receive(
        self, peer: str, doc_id: str, data: bytes, *, validate: Validator | None = None
    ) -> list[tuple[bytes, bytes]]:
        """Apply a peer's sync message. Returns the new changes (hash, bytes) to store.

        The message goes straight into the live document: Automerge queues changes
        whose dependencies have not arrived yet inside the document itself, so
        applying to a copy and merging would lose them and stall the sync. What
        guards the live document is that a message which does not parse or apply
        raises before anything changes. A document we did not hold is built
        apart and adopted only when `validate` (if given) accepts it.

        Raises:
            InvalidSyncMessage: bad bytes, changes that do not apply, or a new
                document that `validate` refuses.
        """
        msg = decode_sync_message(data)
        current = self.docs.get(doc_id)
        if current is not None and check_sync_message(data):
            # A second root change would graft another history beside the
            # session's own, and Automerge would hide one side of every root key.
            trial = current.fork()
            try:
                trial.receive_sync_message(SyncState(), decode_sync_message(data))
            except BaseException as exc:
                if not _is_engine_error(exc):
                    raise
                self.book.reset(peer, doc_id)
                raise InvalidSyncMessage(f"sync message for {doc_id!r} does not apply: {exc}") from exc
            if root_changes(trial) > 1:
                self.book.reset(peer, doc_id)
                raise InvalidSyncMessage(f"sync message for {doc_id!r} brings a second, unrelated history")
        incoming = self._incoming.pop(doc_id, None)
        target = current if current is not None else incoming if incoming is not None else Document()
        before = target.get_heads()
        try:
            target.receive_sync_message(self.book.state(peer, doc_id), msg)
        except BaseException as exc:
            if not _is_engine_error(exc):
                raise
            self.book.reset(peer, doc_id)
            raise InvalidSyncMessage(f"sync message for {doc_id!r} does not apply: {exc}") from exc
        if target.get_heads() == before:
            if current is None:  # changes may wait in its queue for their dependencies
                self._incoming[doc_id] = target
            return []
        if current is None:
            try:
                if root_changes(target) != 1:
                    raise InvalidSyncMessage("a document has exactly one root change")
                if validate is not None:
                    validate(target)
            except Exception as exc:
                self.book.reset(peer, doc_id)
                raise InvalidSyncMessage(f"new document {doc_id!r} is not acceptable: {exc}") from exc
            self.docs[doc_id] = target
            return self._listed(target, [])
        return self._listed(target, before)

    def _listed(self, doc: Document, since: list[bytes]) -> list[tuple[bytes, bytes]]:
        if self.change_bytes:
            return [(c.hash, c.bytes) for c in doc.get_changes(since)]
        return [(c.hash, b"") for c in doc.get_changes(since)]
