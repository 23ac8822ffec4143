"""What the replication core asks the I/O layer to do (STYLE rule 5: frozen dataclasses).

The core (`Replicator`) never sends anything itself: `Replicator.poll(now)`
returns a list of these actions and the trio layer in `Node` carries them out,
then sleeps until `Replicator.next_deadline()` or the next input.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SendHello:
    """Introduce ourselves to an address and learn who answers (POST /m/hello).

    The answer is the only thing that makes an address a peer (`Replicator.hello_ok`)."""

    address: str


@dataclass(frozen=True)
class SendPush:
    """Push, one way, what `peer` lacks of these documents (POST /m/push, no response).

    The I/O layer builds the payload from the documents and the heads the core
    says the peer holds (`Replicator.known_heads`), up to the byte cap, reports
    what it put in with `Replicator.pushed`, and hands back what did not fit with
    `Replicator.requeue`."""

    peer: str
    address: str
    docs: tuple[str, ...]


@dataclass(frozen=True)
class StartExchange:
    """Run one anti-entropy exchange with `peer`: heads-hash first (POST /m/state),
    then digest and Automerge sync only when the hashes differ. Report the end
    with `Replicator.exchange_done` or `Replicator.exchange_failed`."""

    peer: str
    address: str


@dataclass(frozen=True)
class SyncDocs:
    """Run Automerge sync with `peer` for these documents now (POST /m/sync), without
    the heads-hash and digest steps: a push from it left a gap here. Report the end
    with `Replicator.repair_done`."""

    peer: str
    address: str
    docs: tuple[str, ...]
    lacking: tuple[tuple[bytes, ...], ...] = ()
    """Per document, the heads of the push that found the gap: if the document holds
    them all by now (the lost push was only late), the I/O layer leaves it out."""


@dataclass(frozen=True)
class Tick:
    """Housekeeping is due: membership heartbeat, election, retention."""


Action = SendHello | SendPush | StartExchange | SyncDocs | Tick

__all__ = ["Action", "SendHello", "SendPush", "StartExchange", "SyncDocs", "Tick"]
