"""DocStore: durable storage of Automerge documents over a key -> bytes storage adapter.

The adapter (`crdt.store`: SQLite, or in memory) knows no meaning; the layout,
compaction, archive and encryption live here. Keys:

    ("name", row)                   the document id (sealed when encrypted)
    ("doc", row, "snapshot")        at most one saved snapshot
    ("doc", row, "change", hash)    each change chunk written after it
    ("archived", row)               present while the document is archived
    ("meta", name)                  small values (incarnation, the key check)

`row` is the document id, %-escaped (or its keyed hash when encrypted); `hash`
the change hash in hex (keyed-hashed when encrypted). Appending a change is one
put; start-up loads every document as `Document.load(snapshot + changes...)`
(Automerge accepts a saved document followed by change chunks, in any order:
a change whose dependencies come later waits in its queue); compaction replaces
a document's change chunks with one fresh snapshot in one atomic batch.

Durability and atomicity are the adapter's (`crdt.store.StorageAdapter`): a batch
is all or nothing and durable when `save_batch` returns, so a crash at any
instant leaves no torn state to repair on start-up.

Encryption at rest: opened with a 32-byte key, the store seals every document
chunk with SecretBox (XSalsa20-Poly1305, pynacl), stores document ids only as
keyed BLAKE2b hashes (the real id sealed beside it) and change hashes keyed the
same way, so the file alone (and its WAL) reveals no session id, id token or
meter value. A store remembers whether it was created with a key, and refuses to
open with a wrong or missing one instead of mixing plain and sealed rows.

In memory, a node holds its documents in `Documents`: a dict of Automerge documents
that keeps only the recently used ones loaded and the others as their saved bytes
(a session of a few events: ~1 KB saved, ~15 KB loaded), so what a node costs grows
with the sessions it works on, not with every session it holds.

Throughput: an fsync costs milliseconds, so `open_doc_store` runs one writer task
that takes *every* write waiting at that moment into one batch (group commit).
A caller's `await store.write(...)` returns only after the commit that holds its
rows. An adapter that does not block (in memory) is called inline instead of in
a worker thread, which keeps virtual time under trio's MockClock reproducible.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sys
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, MutableMapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import nacl.exceptions
import nacl.secret
import trio
from automerge.core import Document

from ._errors import DocumentError, LocalError, StoreError
from .store import SqliteAdapter, StorageAdapter, StorageKey

Change = tuple[bytes, bytes]
"""(change hash, change bytes) as produced by Replica / Document.get_changes."""

_CHECK = b"meshnode store"
_T = TypeVar("_T")


class _Codec:
    """How ids and chunks look on disk: as they are, or keyed-hashed and sealed."""

    def __init__(self, key: bytes | None) -> None:
        self.encrypted = key is not None
        if key is not None:
            if len(key) != nacl.secret.SecretBox.KEY_SIZE:
                raise LocalError(f"a store key is {nacl.secret.SecretBox.KEY_SIZE} bytes, got {len(key)}")
            self._box = nacl.secret.SecretBox(key)
            self._mac = hashlib.blake2b(b"meshnode store ids", key=key).digest()

    def row(self, doc_id: str) -> str:
        if not self.encrypted:
            return urllib.parse.quote(doc_id, safe="") or "%"
        return hashlib.blake2b(doc_id.encode(), key=self._mac, digest_size=16).hexdigest()

    def change_hash(self, h: bytes) -> str:
        if self.encrypted:
            h = hashlib.blake2b(h, key=self._mac, digest_size=32).digest()
        return h.hex()

    def seal(self, data: bytes) -> bytes:
        return bytes(self._box.encrypt(data)) if self.encrypted else data

    def open(self, data: bytes) -> bytes:
        if not self.encrypted:
            return bytes(data)
        try:
            return self._box.decrypt(bytes(data))
        except nacl.exceptions.CryptoError as exc:
            raise StoreError("a stored chunk does not decrypt: wrong store key, or the file was altered") from exc


class DocStore:
    """Synchronous document store over a storage adapter; see `open_doc_store` for trio.

    Args:
        path: a SQLite file, when no `adapter` is given.
        adapter: where the bytes go (`crdt.store.SqliteAdapter`, `MemoryAdapter`, ...).
            The store closes it on `close`.
        key: 32-byte SecretBox key: encrypt the store at rest.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        adapter: StorageAdapter | None = None,
        key: bytes | None = None,
    ) -> None:
        if (path is None) == (adapter is None):
            raise LocalError("a DocStore is opened on a path or on an adapter (one of them)")
        self._codec = _Codec(key)
        if adapter is None:
            assert path is not None
            adapter = SqliteAdapter(path)
        self.adapter = adapter
        self.path = os.fspath(path) if path is not None else type(adapter).__name__
        self._named: set[str] = set()
        self._named_lock = threading.Lock()
        try:
            if isinstance(adapter, SqliteAdapter) and adapter.legacy:
                self._import_legacy(adapter)
            self._check_key()
        except StoreError:
            adapter.close()
            raise
        self.commits = 0
        """Write batches committed (one per group commit)."""

    def _import_legacy(self, adapter: SqliteAdapter) -> None:
        """Convert a file of meshnode 0.1 (tables changes, snapshots, meta, names) in one transaction.

        The chunks were sealed the same way, so they are copied as they are; the
        rows are re-keyed: ids from the sealed names, change hashes (raw, or
        keyed-hashed when encrypted) in hex.
        """
        rows = adapter.legacy_rows()
        meta = {str(k): bytes(v) for k, v in rows["meta"]}
        check = meta.get("_codec")
        if check is not None:
            self._verify_check(check)
        c = self._codec
        new_row = {}
        puts: list[tuple[StorageKey, bytes]] = []
        for old_row, name in rows["names"]:
            new_row[old_row] = row = c.row(c.open(bytes(name)).decode())
            puts.append((("name", row), bytes(name)))
        for old_row, h, data in rows["changes"]:
            puts.append((("doc", new_row[old_row], "change", bytes(h).hex()), bytes(data)))
        for old_row, data, archived in rows["snapshots"]:
            puts.append((("doc", new_row[old_row], "snapshot"), bytes(data)))
            if archived:
                puts.append((("archived", new_row[old_row]), b""))
        puts.extend((("meta", k), v) for k, v in meta.items())
        adapter.replace_legacy(puts)

    @property
    def encrypted(self) -> bool:
        return self._codec.encrypted

    @property
    def blocking(self) -> bool:
        return self.adapter.blocking

    def _check_key(self) -> None:
        stored = self.adapter.load(("meta", "_codec"))
        if stored is None:
            self.adapter.save_batch([(("meta", "_codec"), self._codec.seal(_CHECK))])
            return
        self._verify_check(stored)

    def _verify_check(self, stored: bytes) -> None:
        """Refuse a wrong or missing key, given the stored check value."""
        if stored == _CHECK:
            if self.encrypted:
                raise StoreError(f"store {self.path} was created without encryption; it cannot be opened with a key")
            return
        if not self.encrypted:
            raise StoreError(f"store {self.path} is encrypted: open it with its key (store.key in the data dir)")
        try:
            ok = self._codec.open(stored) == _CHECK
        except StoreError:
            ok = False
        if not ok:
            raise StoreError(f"store {self.path}: wrong store key")

    def close(self) -> None:
        self.adapter.close()

    def write_batch(self, items: Iterable[tuple[str, Sequence[Change]]]) -> None:
        """Append changes of several documents in one durable batch."""
        c = self._codec
        puts: list[tuple[StorageKey, bytes]] = []
        named = []
        for doc_id, changes in items:
            if not changes:
                continue
            row = c.row(doc_id)
            if row not in self._named:
                puts.append((("name", row), c.seal(doc_id.encode())))
                named.append(row)
            puts.extend((("doc", row, "change", c.change_hash(h)), c.seal(data)) for h, data in changes)
        if not puts:
            return
        self.adapter.save_batch(puts)
        with self._named_lock:
            self._named.update(named)
            self.commits += 1

    def doc_ids(self) -> list[str]:
        return sorted(self._codec.open(v).decode() for _, v in self.adapter.load_range(("name",)))

    def _chunks(self, entries: Iterable[tuple[StorageKey, bytes]]) -> bytes | None:
        """Snapshot first, then change chunks, from the entries of one document."""
        snapshot = b""
        changes = []
        for key, value in entries:
            if key[2] == "snapshot":
                snapshot = self._codec.open(value)
            elif key[2] == "change":
                changes.append(self._codec.open(value))
        if not snapshot and not changes:
            return None
        return snapshot + b"".join(changes)

    def load_bytes(self, doc_id: str) -> bytes | None:
        """The stored bytes of a document (snapshot, then changes), or None."""
        return self._chunks(self.adapter.load_range(("doc", self._codec.row(doc_id))))

    @staticmethod
    def _document(doc_id: str, data: bytes) -> Document:
        try:
            return Document.load(data)
        except Exception as exc:
            raise DocumentError(f"stored document {doc_id!r} does not load: {exc}") from exc

    def load(self, doc_id: str) -> Document | None:
        data = self.load_bytes(doc_id)
        return None if data is None else self._document(doc_id, data)

    def load_all(self, *, include_archived: bool = False) -> dict[str, Document]:
        """Every document in the store (archived ones only when asked), in one pass over it."""
        return {
            d: self._document(d, data) for d, data in self.load_all_bytes(include_archived=include_archived).items()
        }

    def load_all_bytes(self, *, include_archived: bool = False) -> dict[str, bytes]:
        """As `load_all`, each document as its stored bytes (for `Document.load`, or `Documents.put_saved`)."""
        names = {key[1]: self._codec.open(v).decode() for key, v in self.adapter.load_range(("name",))}
        skip = set() if include_archived else {key[1] for key, _ in self.adapter.load_range(("archived",))}
        by_row: dict[str, list[tuple[StorageKey, bytes]]] = {}
        for key, value in self.adapter.load_range(("doc",)):
            if key[1] not in skip:
                by_row.setdefault(key[1], []).append((key, value))
        with self._named_lock:
            self._named.update(names)
        out = {}
        for row, entries in by_row.items():
            data = self._chunks(entries)
            if data is not None and row in names:
                out[names[row]] = data
        return dict(sorted(out.items()))

    def compact(self, doc_id: str, doc: Document, *, archive: bool = False) -> None:
        """Replace a document's change chunks with one snapshot of `doc`, atomically.

        `doc` must hold every stored change of the document (the in-memory replica
        the store was fed from); chunks it does not cover are kept, so a change
        that was written meanwhile is never lost.
        """
        c = self._codec
        row = c.row(doc_id)
        snapshot = c.seal(doc.save())
        covered = {c.change_hash(ch.hash) for ch in doc.get_changes([])}
        stored = self.adapter.load_range(("doc", row, "change"))
        puts: list[tuple[StorageKey, bytes]] = [
            (("name", row), c.seal(doc_id.encode())), (("doc", row, "snapshot"), snapshot),
        ]  # fmt: skip
        removes = [key for key, _ in stored if key[3] in covered]
        if archive:
            puts.append((("archived", row), b""))
        else:
            removes.append(("archived", row))
        try:
            self.adapter.save_batch(puts, removes)
        except StoreError as exc:
            raise StoreError(f"cannot compact {doc_id!r}: {exc}") from exc
        with self._named_lock:
            self._named.add(row)

    def archived_ids(self) -> list[str]:
        out = []
        for key, _ in self.adapter.load_range(("archived",)):
            name = self.adapter.load(("name", key[1]))
            if name is not None:
                out.append(self._codec.open(name).decode())
        return sorted(out)

    def change_count(self, doc_id: str) -> int:
        return len(self.adapter.load_range(("doc", self._codec.row(doc_id), "change")))

    def get_meta(self, key: str) -> bytes | None:
        value = self.adapter.load(("meta", key))
        return self._codec.open(value) if value is not None else None

    def set_meta(self, key: str, value: bytes) -> None:
        try:
            self.adapter.save_batch([(("meta", key), self._codec.seal(value))])
        except StoreError as exc:
            raise StoreError(f"cannot write meta {key!r}: {exc}") from exc


class _Held:
    """One document of `Documents`: loaded, as bytes, or both."""

    __slots__ = ("doc", "saved", "heads")

    def __init__(self, doc: Document | None, saved: bytes | None = None) -> None:
        self.doc = doc
        self.saved = saved
        """Bytes that load as the document at `heads` (None: only `doc` has it): the store's
        snapshot and change chunks, or `Document.save()`."""
        self.heads: list[bytes] | None = None
        """Heads of `saved`; None until the document was loaded once."""


def _refs(held: _Held) -> int:
    return sys.getrefcount(held.doc)


_UNREFERENCED = _refs(_Held(Document()))
"""`_refs` of a loaded document that nothing but its `_Held` refers to."""


class Documents(MutableMapping[str, Document]):
    """A node's documents by id, as a dict of Automerge documents, with at most `capacity`
    of them loaded: the others are held as their saved bytes (a session of a few events
    is ~1 KB saved and ~15 KB loaded) and loaded again when read.

    - Reading one (``docs[d]``, ``get``, ``values()``, ``items()``) loads it if need be
      and makes it the most recently used; past `capacity`, the least recently used go
      back to bytes. ``d in docs``, ``len``, iterating ids and `heads` load nothing.
    - One that changed since it was loaded is saved (`Document.save`) when it goes; one
      that did not keeps the bytes it was loaded from. (Saving each at start-up to compact
      the store's chunks, ~1.5 KB, to ~1.1 KB cost more than it saved: each new long-lived
      bytes object, made between the loads' short-lived allocations, kept heap pages from
      being returned, ~9 MB for 1,000 sessions.)
    - Never unloaded: the `pinned` ids, and a document something else still refers to (a
      caller holding it across an await, a sync in progress, a test): unloading it would
      leave the holder changing a copy nobody reads. Those stay loaded, past `capacity`
      if need be, until they are let go.
    - What a loaded document holds beyond its history goes with it: Automerge's queue of
      received changes that wait for a dependency (applied to nothing, stored nowhere).
      Sync asks for them again as after a lost push: the sender's heads stay ahead of ours.
    """

    def __init__(self, *, capacity: int = 128, pinned: Iterable[str] = ()) -> None:
        if capacity < 1:
            raise LocalError("Documents needs a capacity of at least 1")
        self.capacity = capacity
        self.pinned = frozenset(pinned)
        self._held: dict[str, _Held] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()
        """The loaded documents, least recently used first."""
        self.loads = 0
        """Documents loaded from bytes (counted for tests and benchmarks)."""
        self.unloads = 0

    # --- the mapping ----------------------------------------------------------------------

    def __getitem__(self, doc_id: str) -> Document:
        held = self._held[doc_id]
        doc = held.doc
        if doc is not None:
            self._lru.move_to_end(doc_id)
            return doc
        assert held.saved is not None
        try:
            doc = Document.load(held.saved)
        except Exception as exc:
            raise DocumentError(f"stored document {doc_id!r} does not load: {exc}") from exc
        self.loads += 1
        if held.heads is None:
            held.heads = doc.get_heads()
        held.doc = doc
        self._lru[doc_id] = None
        self._shrink()
        return doc

    def __setitem__(self, doc_id: str, doc: Document) -> None:
        self._held[doc_id] = _Held(doc)
        self._lru[doc_id] = None
        self._lru.move_to_end(doc_id)
        self._shrink()

    def __delitem__(self, doc_id: str) -> None:
        del self._held[doc_id]
        self._lru.pop(doc_id, None)

    def get(self, doc_id: str, default: Document | None = None) -> Document | None:  # type: ignore[override]
        # As Mapping.get, without its try/except around __getitem__ (the engine's hot path).
        held = self._held.get(doc_id)
        if held is None:
            return default
        if held.doc is not None:
            self._lru.move_to_end(doc_id)
            return held.doc
        return self[doc_id]

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._held

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)

    def clear(self) -> None:
        self._held.clear()
        self._lru.clear()

    def __repr__(self) -> str:
        return f"<Documents {len(self._held)} held, {len(self._lru)} loaded>"

    # --- without loading ------------------------------------------------------------------

    def put_saved(self, doc_id: str, data: bytes) -> None:
        """Hold a document as bytes (a stored one: the store's snapshot and change chunks)."""
        self._lru.pop(doc_id, None)
        self._held[doc_id] = _Held(None, data)

    def heads(self, doc_id: str) -> list[bytes]:
        """The document's heads (as `Document.get_heads`), loading it only if it never was."""
        held = self._held[doc_id]
        if held.doc is not None:
            return held.doc.get_heads()
        if held.heads is None:
            return self[doc_id].get_heads()
        return list(held.heads)

    def held_bytes(self, doc_id: str) -> bytes | None:
        """The bytes the document is held as (None for one added loaded and not unloaded since);
        a loaded document may have changed since."""
        return self._held[doc_id].saved

    @property
    def loaded(self) -> int:
        """How many documents are loaded now."""
        return len(self._lru)

    def is_loaded(self, doc_id: str) -> bool:
        return doc_id in self._lru

    # --- unloading ------------------------------------------------------------------------

    def _shrink(self) -> None:
        """Unload the least recently used documents past `capacity` that may go."""
        if len(self._lru) <= self.capacity:
            return
        for doc_id in list(self._lru):
            if len(self._lru) <= self.capacity:
                return
            held = self._held[doc_id]
            if doc_id in self.pinned or _refs(held) > _UNREFERENCED:
                continue
            self._unload(doc_id, held)

    def _unload(self, doc_id: str, held: _Held) -> None:
        doc = held.doc
        assert doc is not None
        heads = doc.get_heads()
        if held.saved is None or held.heads != heads:
            held.saved, held.heads = doc.save(), heads
        held.doc = None
        del doc
        del self._lru[doc_id]
        self.unloads += 1


@dataclass
class _Pending:
    items: list[tuple[str, Sequence[Change]]]
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class AsyncDocStore:
    """The DocStore seen from trio: durable writes with group commit.

    Get one from `open_doc_store`. Reads of single documents go straight to the
    adapter (they are fast and never wait for an fsync); the long calls
    (`load_all`, `compact`) run in a worker thread when the adapter blocks.
    """

    def __init__(self, store: DocStore, max_batch: int = 4096, *, inline: bool | None = None) -> None:
        self.sync = store
        self.inline = not store.blocking if inline is None else inline
        """Commit in the calling thread (an adapter that does not block, or asked for)."""
        self._send, self._recv = trio.open_memory_channel[_Pending](math.inf)
        self._max_batch = max_batch
        self._closed = False

    @property
    def blocking(self) -> bool:
        """False when every call returns at once (see `StorageAdapter.blocking`)."""
        return not self.inline

    async def _run(self, fn: Callable[..., _T], *args: object, **kwargs: object) -> _T:
        if self.inline:
            result = fn(*args, **kwargs)
            await trio.lowlevel.checkpoint()
            return result
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def load_all(self, *, include_archived: bool = False) -> dict[str, Document]:
        return await self._run(self.sync.load_all, include_archived=include_archived)

    async def load_all_bytes(self, *, include_archived: bool = False) -> dict[str, bytes]:
        return await self._run(self.sync.load_all_bytes, include_archived=include_archived)

    async def compact(self, doc_id: str, doc: Document, *, archive: bool = False) -> None:
        await self._run(self.sync.compact, doc_id, doc, archive=archive)

    async def write(self, doc_id: str, changes: Sequence[Change]) -> None:
        """Append changes; returns once they are committed durably."""
        await self.write_many([(doc_id, changes)])

    async def write_many(self, items: Sequence[tuple[str, Sequence[Change]]]) -> None:
        if self._closed:
            raise LocalError("the store is closed")
        if not any(changes for _, changes in items):
            return
        if self.inline:
            # Commit in this thread, so virtual time never runs ahead while a
            # worker thread writes (simulated runs stay reproducible).
            self.sync.write_batch(items)
            await trio.lowlevel.checkpoint()
            return
        pending = _Pending(list(items))
        self._send.send_nowait(pending)
        # Shielded: once queued, the rows will be committed; a cancelled caller
        # must not walk away believing they were not.
        with trio.CancelScope(shield=True):
            await pending.done.wait()
        if pending.error is not None:
            raise StoreError(f"write failed: {pending.error}") from pending.error

    async def _serve_writes(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        # Shielded: the loop ends when the channel is closed (the store closes),
        # so rows already queued are committed even when the node is cancelled.
        with trio.CancelScope(shield=True):
            async for first in self._recv:
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                items = [item for p in batch for item in p.items]
                try:
                    await trio.to_thread.run_sync(self.sync.write_batch, items)
                except Exception as exc:  # StoreError, or a bug: never leave a writer waiting
                    for p in batch:
                        p.error = exc
                for p in batch:
                    p.done.set()


StoreOpener = Callable[[], AbstractAsyncContextManager[AsyncDocStore]]
"""What a node is given to open its store: `functools.partial(open_doc_store, ...)`."""


@asynccontextmanager
async def open_doc_store(
    path: str | os.PathLike[str] | None = None,
    *,
    adapter: StorageAdapter | None = None,
    inline: bool | None = None,
    key: bytes | None = None,
) -> AsyncIterator[AsyncDocStore]:
    """Open a store and its group-commit writer; everything queued is committed before close.

    Args:
        path: a SQLite file (`crdt.store.SqliteAdapter`), when no `adapter` is given.
        adapter: the storage adapter; closed with the store.
        inline: commit in the calling thread instead of a worker thread (no
            group commit). Defaults to "when the adapter does not block".
        key: 32-byte SecretBox key: encrypt the store at rest.
    """
    store = DocStore(path, adapter=adapter, key=key)
    try:
        async with trio.open_nursery() as nursery:
            astore = AsyncDocStore(store, inline=inline)
            await nursery.start(astore._serve_writes)
            try:
                yield astore
            finally:
                astore._closed = True
                astore._send.close()
    finally:
        store.close()
