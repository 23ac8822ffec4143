"""Error types of the `crdt` package, split by whose fault they are.

`LocalError` is a misuse by the code calling us (a programming error or a bad
argument from our own user). `RemoteError` is bad input that arrived from
somewhere else (a peer, a file, a sync message): the caller answers it with an
error and keeps serving, and nothing has been changed.
"""

from __future__ import annotations


class CrdtError(Exception):
    """Base of every error this package raises on purpose."""


class LocalError(CrdtError):
    """The caller misused the API: a bug or a bad argument on our side."""


class RemoteError(CrdtError):
    """Input from elsewhere (peer, disk, sync message) is not acceptable."""


# --- event verification -------------------------------------------------------


class EventError(RemoteError):
    """An event record failed verification. `event_id` is set when known."""

    reason = "invalid event"

    def __init__(self, message: str, *, event_id: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id


class MalformedEvent(EventError):
    """The bytes are not CBOR, or not an event envelope, or a field has a wrong type."""

    reason = "malformed"


class MissingField(EventError):
    """A required field of the event record is absent."""

    reason = "missing_field"


class BadSignature(EventError):
    """The Ed25519 signature does not match the record and the device's key."""

    reason = "bad_signature"


class UnknownKey(EventError):
    """The device that claims to have signed the record is not in the keyring."""

    reason = "unknown_key"


class BrokenChain(EventError):
    """`prev` is not the hash of the device's previous event, or `seq` does not follow it."""

    reason = "broken_chain"


# --- documents, sync, store ---------------------------------------------------


class DocumentError(RemoteError):
    """A document (or saved bytes of one) does not have the expected shape."""


class InvalidSyncMessage(RemoteError):
    """A peer sent bytes that are not an Automerge sync message, or one that does not apply."""


class StoreError(CrdtError):
    """The durable store failed (disk, SQLite); our own failure, not the peer's."""
