"""MemoryAdapter: the in-memory storage adapter (tests, simulator)."""

from __future__ import annotations

from collections.abc import Sequence

from .._errors import LocalError
from ._adapter import StorageKey, check_key


class MemoryAdapter:
    """Keys and values in a dict that outlives the adapter.

    Pass the same `data` dict to a new adapter to model a restart on the same
    disk (what was saved is there, nothing else); a fresh dict is a wiped disk.

    Args:
        data: the "disk"; a new empty one when omitted.
    """

    blocking = False

    def __init__(self, data: dict[StorageKey, bytes] | None = None) -> None:
        self.data: dict[StorageKey, bytes] = {} if data is None else data
        self.batches = 0
        """Batches saved through this adapter (a commit count for tests)."""
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise LocalError("the storage adapter is closed")

    def load(self, key: StorageKey) -> bytes | None:
        self._check_open()
        check_key(key)
        return self.data.get(key)

    def load_range(self, prefix: StorageKey) -> list[tuple[StorageKey, bytes]]:
        self._check_open()
        check_key(prefix, prefix=True)
        n = len(prefix)
        return sorted((k, v) for k, v in self.data.items() if k[:n] == prefix)

    def save_batch(self, puts: Sequence[tuple[StorageKey, bytes]], removes: Sequence[StorageKey] = ()) -> None:
        self._check_open()
        puts = [(key, bytes(value)) for key, value in puts]
        for key in removes:
            check_key(key)
        for key, _ in puts:
            check_key(key)
        # Checked before anything changes: a bad batch leaves the data as it was.
        for key in removes:
            self.data.pop(key, None)
        self.data.update(puts)
        self.batches += 1

    def close(self) -> None:
        self._closed = True
