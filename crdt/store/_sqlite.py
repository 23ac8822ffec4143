"""SqliteAdapter: keys and values in one SQLite table, every batch one durable transaction.

Durability: WAL journal with `synchronous=FULL`, so a batch has reached the disk
when `COMMIT` returns; SQLite's transactions make it atomic, so a crash at any
instant leaves the whole batch or none of it.

Keys are stored as their parts joined by "/" (which no part may contain), so
the keys under a prefix are one index range: `prefix/` <= key < `prefix0`
("0" is the character after "/").
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any

from .._errors import LocalError, StoreError
from ._adapter import StorageKey, check_key

_LEGACY_TABLES = ("changes", "snapshots", "meta", "names")
_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"


class SqliteAdapter:
    """The storage adapter on a SQLite file. Thread-safe through one lock.

    Args:
        path: the database file (created when missing).
    """

    blocking = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._closed = False
        self.batches = 0
        """Transactions committed by `save_batch` (a commit count for tests and benchmarks)."""
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            self.legacy = set(_LEGACY_TABLES) <= tables
            """The file still has the tables of meshnode 0.1: `DocStore` imports them once."""
            self._db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        except StoreError:
            self._db.close()
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise LocalError(f"store {self.path} is closed")

    def load(self, key: StorageKey) -> bytes | None:
        check_key(key)
        with self._lock:
            self._check_open()
            try:
                row = self._db.execute("SELECT value FROM kv WHERE key = ?", ("/".join(key),)).fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read store {self.path}: {exc}") from exc
        return bytes(row[0]) if row is not None else None

    def load_range(self, prefix: StorageKey) -> list[tuple[StorageKey, bytes]]:
        check_key(prefix, prefix=True)
        with self._lock:
            self._check_open()
            try:
                if prefix:
                    low = "/".join(prefix)
                    rows = self._db.execute(
                        "SELECT key, value FROM kv WHERE key = ? OR (key >= ? AND key < ?) ORDER BY key",
                        (low, low + "/", low + "0"),
                    ).fetchall()
                else:
                    rows = self._db.execute("SELECT key, value FROM kv ORDER BY key").fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read store {self.path}: {exc}") from exc
        out = [(tuple(k.split("/")), bytes(v)) for k, v in rows]
        out.sort()  # by parts: "a/b" sorts before "a-b" as a tuple, not as text
        return out

    def save_batch(self, puts: Sequence[tuple[StorageKey, bytes]], removes: Sequence[StorageKey] = ()) -> None:
        for key in removes:
            check_key(key)
        for key, _ in puts:
            check_key(key)
        put_rows = [("/".join(key), bytes(value)) for key, value in puts]
        remove_rows = [("/".join(key),) for key in removes]
        with self._lock:
            self._check_open()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("DELETE FROM kv WHERE key = ?", remove_rows)
                self._db.executemany(
                    "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    put_rows,
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # no transaction was open: nothing to undo
                raise StoreError(f"cannot write to store {self.path}: {exc}") from exc
            self.batches += 1

    def legacy_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """The rows of the 0.1 layout's tables, as stored (changes in the order written)."""
        with self._lock:
            self._check_open()
            try:
                return {
                    "changes": self._db.execute("SELECT doc_id, hash, data FROM changes ORDER BY id").fetchall(),
                    "snapshots": self._db.execute("SELECT doc_id, data, archived FROM snapshots").fetchall(),
                    "meta": self._db.execute("SELECT key, value FROM meta").fetchall(),
                    "names": self._db.execute("SELECT doc_id, name FROM names").fetchall(),
                }
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the old tables of {self.path}: {exc}") from exc

    def replace_legacy(self, puts: Sequence[tuple[StorageKey, bytes]]) -> None:
        """Save `puts` and drop the 0.1 tables, in one transaction (a crash leaves one layout or the other)."""
        for key, _ in puts:
            check_key(key)
        rows = [("/".join(key), bytes(value)) for key, value in puts]
        with self._lock:
            self._check_open()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", rows)
                for table in _LEGACY_TABLES:
                    self._db.execute(f"DROP TABLE {table}")
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # no transaction was open: nothing to undo
                raise StoreError(f"cannot convert {self.path} to the key-value layout: {exc}") from exc
            self.legacy = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
