"""Storage adapters: a small key -> bytes interface, a SQLite adapter and an in-memory one.

An adapter knows no meaning (STYLE rule 8): it stores opaque values under keys
that are tuples of strings, loads one key or every key under a prefix, and
applies a batch of puts and removes atomically and durably. What the keys and
values mean — documents, snapshots, change chunks, archive flags, encryption —
is `crdt.DocStore`'s business. The shape follows automerge-repo's
`StorageAdapterInterface` (load, save, remove, loadRange, removeRange), with
one batch call instead of separate saves so that a group commit is one atomic,
durable transaction.

Both adapters pass one conformance suite (tests/test_store_conformance.py).
"""

from ._adapter import StorageAdapter, StorageKey, check_key
from ._memory import MemoryAdapter
from ._sqlite import SqliteAdapter

__all__ = ["MemoryAdapter", "SqliteAdapter", "StorageAdapter", "StorageKey", "check_key"]
