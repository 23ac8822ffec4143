"""DocStore: durable storage of Automerge documents in SQLite.

Layout: each document is at most one saved snapshot plus the change chunks that
came after it. Appending a change is an INSERT; start-up loads every document as
`Document.load(snapshot + changes...)` (Automerge accepts a saved document
followed by change chunks); compaction replaces a document's rows with one fresh
snapshot in a single transaction.

Durability: WAL journal with `synchronous=FULL`, so a commit has reached the
disk when `COMMIT` returns. SQLite's transactions make every commit atomic, so a
crash at any instant leaves either the whole batch or none of it: there is no torn
state to repair on start-up.

Encryption at rest: opened with a 32-byte key, the store seals every document
chunk with SecretBox (XSalsa20-Poly1305, pynacl), stores document ids only as
keyed BLAKE2b hashes (the real id sealed beside it) and change hashes keyed the
same way, so the file alone (and its WAL) reveals no session id, id token or
meter value. A store remembers whether it was created with a key, and refuses to
open with a wrong or missing one instead of mixing plain and sealed rows.

Throughput: an fsync costs milliseconds, so `open_doc_store` runs one writer task
that takes *every* write waiting at that moment into one transaction (group
commit). A caller's `await store.write(...)` returns only after the commit that
holds its rows.
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.secret
import trio
from automerge.core import Document

from ._errors import DocumentError, LocalError, StoreError

Change = tuple[bytes, bytes]
"""(change hash, change bytes) as produced by Replica / Document.get_changes."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    id      INTEGER PRIMARY KEY,
    doc_id  TEXT NOT NULL,
    hash    BLOB NOT NULL,
    data    BLOB NOT NULL,
    UNIQUE (doc_id, hash)
);
CREATE TABLE IF NOT EXISTS snapshots (
    doc_id  TEXT PRIMARY KEY,
    data    BLOB NOT NULL,
    archived INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (
    key     TEXT PRIMARY KEY,
    value   BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS names (
    doc_id  TEXT PRIMARY KEY,
    name    BLOB NOT NULL
);
"""

_CHECK = b"meshnode store"


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
            return doc_id
        return hashlib.blake2b(doc_id.encode(), key=self._mac, digest_size=16).hexdigest()

    def change_hash(self, h: bytes) -> bytes:
        return hashlib.blake2b(h, key=self._mac, digest_size=32).digest() if self.encrypted else h

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
    """Synchronous SQLite store. Thread-safe through one lock; see `open_doc_store`."""

    def __init__(self, path: str | os.PathLike[str], *, key: bytes | None = None) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._codec = _Codec(key)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._check_key()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        except StoreError:
            self._db.close()
            raise
        self.commits = 0

    @property
    def encrypted(self) -> bool:
        return self._codec.encrypted

    def _check_key(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = '_codec'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta (key, value) VALUES ('_codec', ?)", (self._codec.seal(_CHECK),))
            return
        stored = bytes(row[0])
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
        with self._lock:
            self._db.close()

    def write_batch(self, items: Iterable[tuple[str, Sequence[Change]]]) -> None:
        """Append changes of several documents in one durable transaction."""
        c = self._codec
        items = list(items)
        rows = [(c.row(d), c.change_hash(h), c.seal(data)) for d, changes in items for h, data in changes]
        names = {c.row(d): d for d, changes in items if changes}
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT OR IGNORE INTO names (doc_id, name) VALUES (?, ?)",
                    [(r, c.seal(d.encode())) for r, d in names.items()],
                )
                self._db.executemany(
                    "INSERT OR IGNORE INTO changes (doc_id, hash, data) VALUES (?, ?, ?)", rows
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"cannot write to store {self.path}: {exc}") from exc
            self.commits += 1

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction was open: nothing to undo

    def doc_ids(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT n.name FROM names n WHERE n.doc_id IN "
                "(SELECT doc_id FROM snapshots UNION SELECT doc_id FROM changes)"
            ).fetchall()
        return sorted(self._codec.open(r[0]).decode() for r in rows)

    def load_bytes(self, doc_id: str) -> bytes | None:
        """The stored bytes of a document (snapshot, then changes), or None."""
        row = self._codec.row(doc_id)
        with self._lock:
            snap = self._db.execute("SELECT data FROM snapshots WHERE doc_id = ?", (row,)).fetchone()
            rows = self._db.execute(
                "SELECT data FROM changes WHERE doc_id = ? ORDER BY id", (row,)
            ).fetchall()
        if snap is None and not rows:
            return None
        chunks = ([snap[0]] if snap else []) + [r[0] for r in rows]
        return b"".join(self._codec.open(chunk) for chunk in chunks)

    def load(self, doc_id: str) -> Document | None:
        data = self.load_bytes(doc_id)
        if data is None:
            return None
        try:
            return Document.load(data)
        except Exception as exc:
            raise DocumentError(f"stored document {doc_id!r} does not load: {exc}") from exc

    def load_all(self, *, include_archived: bool = False) -> dict[str, Document]:
        """Every document in the store (archived ones only when asked)."""
        archived = set() if include_archived else set(self.archived_ids())
        return {d: doc for d in self.doc_ids() if d not in archived and (doc := self.load(d)) is not None}

    def compact(self, doc_id: str, doc: Document, *, archive: bool = False) -> None:
        """Replace a document's rows with one snapshot of `doc`.

        `doc` must hold every stored change of the document (the in-memory replica
        the store was fed from); rows it does not cover are kept, so a change that
        was written meanwhile is never lost.
        """
        c = self._codec
        snapshot = c.seal(doc.save())
        covered = {c.change_hash(ch.hash) for ch in doc.get_changes([])}
        row = c.row(doc_id)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                rows = self._db.execute(
                    "SELECT id, hash FROM changes WHERE doc_id = ?", (row,)
                ).fetchall()
                self._db.execute(
                    "INSERT OR IGNORE INTO names (doc_id, name) VALUES (?, ?)", (row, c.seal(doc_id.encode()))
                )
                self._db.execute(
                    "INSERT INTO snapshots (doc_id, data, archived) VALUES (?, ?, ?) "
                    "ON CONFLICT (doc_id) DO UPDATE SET data = excluded.data, archived = excluded.archived",
                    (row, snapshot, int(archive)),
                )
                self._db.executemany(
                    "DELETE FROM changes WHERE id = ?", [(i,) for i, h in rows if bytes(h) in covered]
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"cannot compact {doc_id!r}: {exc}") from exc

    def archived_ids(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT n.name FROM names n JOIN snapshots s ON s.doc_id = n.doc_id WHERE s.archived = 1"
            ).fetchall()
        return sorted(self._codec.open(r[0]).decode() for r in rows)

    def change_count(self, doc_id: str) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT count(*) FROM changes WHERE doc_id = ?", (self._codec.row(doc_id),)
            ).fetchone()[0]

    def get_meta(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return self._codec.open(row[0]) if row else None

    def set_meta(self, key: str, value: bytes) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, self._codec.seal(value)),
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write meta {key!r}: {exc}") from exc


@dataclass
class _Pending:
    items: list[tuple[str, Sequence[Change]]]
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class AsyncDocStore:
    """The DocStore seen from trio: durable writes with group commit.

    Get one from `open_doc_store`. Reads go straight to SQLite (they are fast
    and never wait for an fsync).
    """

    def __init__(self, store: DocStore, max_batch: int = 4096, *, inline: bool = False) -> None:
        self.sync = store
        self.inline = inline
        self._send, self._recv = trio.open_memory_channel[_Pending](math.inf)
        self._max_batch = max_batch
        self._closed = False

    async def write(self, doc_id: str, changes: Sequence[Change]) -> None:
        """Append changes; returns once they are committed durably."""
        await self.write_many([(doc_id, changes)])

    async def write_many(self, items: Sequence[tuple[str, Sequence[Change]]]) -> None:
        if self._closed:
            raise LocalError("the store is closed")
        if not any(changes for _, changes in items):
            return
        if self.inline:
            # Simulator mode: commit in this thread, so virtual time never runs
            # ahead while a worker thread writes (results stay reproducible).
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


@asynccontextmanager
async def open_doc_store(
    path: str | os.PathLike[str], *, inline: bool = False, key: bytes | None = None
) -> AsyncIterator[AsyncDocStore]:
    """Open a store and its group-commit writer; everything queued is committed before close.

    Args:
        inline: commit in the calling thread instead of a worker thread (no group
            commit). For the simulator under trio's MockClock, where a worker
            thread would let virtual time jump while it writes.
        key: 32-byte SecretBox key: encrypt the store at rest.
    """
    store = DocStore(path, key=key)
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
