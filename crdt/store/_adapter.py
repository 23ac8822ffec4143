"""The storage adapter interface."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .._errors import LocalError

StorageKey = tuple[str, ...]
"""A key: one or more non-empty strings without "/" (a path, like automerge-repo's StorageKey)."""


def check_key(key: StorageKey, *, prefix: bool = False) -> None:
    """Raise LocalError unless `key` is a valid key (or, with `prefix`, a valid key prefix)."""
    if not isinstance(key, tuple) or (not key and not prefix):
        raise LocalError(f"a storage key is a non-empty tuple of strings, got {key!r}")
    for part in key:
        if not isinstance(part, str) or not part or "/" in part:
            raise LocalError(f"a storage key part is a non-empty string without '/', got {part!r} in {key!r}")


class StorageAdapter(Protocol):
    """Opaque bytes under keys. Every method may raise `crdt.StoreError` when the medium fails.

    Rules every adapter keeps (the conformance suite checks them):

    1. `save_batch` is atomic: after it returns every put and remove of the
       batch is in effect; after it raises none is (nothing half-done).
    2. `save_batch` is durable when it returns (a real adapter has synced it).
    3. `load_range(prefix)` returns every (key, value) whose key starts with the
       prefix's parts, sorted by key; `()` is every key.
    4. A key and a longer key under it are distinct entries (a prefix is not a
       directory that must exist).
    5. Values come back as the bytes that were saved; keys as tuples of str.
    6. After `close`, every call raises `crdt.LocalError`.
    """

    blocking: bool
    """True when calls wait for a disk: callers run them in a worker thread.
    False when they return at once (in memory): callers run them inline, which
    keeps virtual time under trio's MockClock reproducible."""

    def load(self, key: StorageKey) -> bytes | None:
        """The value under `key`, or None."""
        ...

    def load_range(self, prefix: StorageKey) -> list[tuple[StorageKey, bytes]]:
        """Every (key, value) under `prefix`, sorted by key."""
        ...

    def save_batch(self, puts: Sequence[tuple[StorageKey, bytes]], removes: Sequence[StorageKey] = ()) -> None:
        """Apply removes, then puts (a put wins over a remove of the same key), atomically and durably."""
        ...

    def close(self) -> None: ...
