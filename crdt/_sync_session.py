"""One Automerge sync exchange with one peer, both sides, without I/O (STYLE rule 19).

Three components run Automerge sync over a batch of documents: node to node (the
mesh), the leader's forwarder to the cloud, and the cloud answering it. They all
follow the same exchange, so it lives here once:

    initiator                                   responder
    ---------                                   ---------
    begin(docs, reset=...)
    next_request() -> SyncRound(msgs, reset)  ──▶  on_request(msgs, reset) -> Applied
                                                   (I/O: persist Applied.changes)
                                              ◀──  replies(msgs, Applied.errors) -> {doc: msg}
    on_reply(msgs, errors) -> Applied
    (I/O: persist Applied.changes)
    next_request() ... until it returns None
    outcome: synced / refused / unsettled
    (abort() if the transport failed or the exchange was cancelled)

The object only decides; the caller moves the bytes (CoAP, HTTPS, in-memory), makes
changes durable before it acknowledges anything, and sleeps. Sync states are the
`Replica`'s, per (peer, document), and outlive one exchange.

Rules, and why:

1. The first request is sent even when we have nothing to say: the peer may have
   something for us, and only a request lets it answer. After that, the exchange
   ends when neither side had anything to say in the last round.
2. A document whose message the other side refused, or whose reply does not apply
   here, has its sync state dropped and leaves the exchange (`refused`): Automerge
   assumes what it sent was delivered, so a state that disagrees with the peer must
   start afresh. Another document of the batch is not held up by it.
3. If the exchange fails part-way (transport error, cancellation, a failed write),
   `abort` drops the states of every document of the batch: neither side can know
   what the other received.
4. Every exchange is bounded: at most `max_rounds` requests (documents still talking
   then are `unsettled`, for the caller to retry later), and at most `max_bytes` of
   sync messages per request. A message over the cap waits, already generated, for
   the next request (its sync state counts it as sent, so it must not be dropped);
   one message is always sent, so a single large document still moves.
5. A reply about a document we did not ask about is ignored and reported
   (`Applied.unexpected`): a peer cannot make us adopt what we did not request.
6. The responder answers at most `max_bytes` of messages too (`replies(...,
   max_bytes=)`): it stops generating at the cap, so what it left out was never
   generated and is not lost. Both sides use the same cap: a reply that reaches
   it keeps every document of the request in the exchange for one more request,
   so the left-out ones get their turn (the round limit still bounds it all).

The responder side is one step per request: `on_request` applies the messages
(resetting the states the initiator asked to reset), `replies` produces the answers
for every document of the request whose message was not refused.

A node-to-node exchange, for instance (the forwarder and the cloud are the same with
their own wire types)::

    session = SyncSession(replica, peer_id, max_rounds=12, max_bytes=256 * 1024,
                          validate=functools.partial(check_document, site))
    session.begin(doc_ids, reset=after_digest)
    try:
        while (step := session.next_request()) is not None:
            reply = await send(SyncRequest(me, step.msgs, step.reset))
            applied = session.on_reply(reply.msgs, reply.errors)
            await store(applied.changes)          # durable before the next request
    except BaseException:
        session.abort()
        raise
    in_step = session.synced                      # refused / unsettled: anti-entropy retries

    # and on the other node, per request:
    session = SyncSession(replica, request.sender, validate=...)
    session.check(request.msgs)                   # InvalidSyncMessage: refuse it whole
    applied = session.on_request(request.msgs, request.reset)
    await store(applied.changes)
    return SyncResponse(session.replies(request.msgs, applied.errors, max_bytes=256 * 1024), applied.errors)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from automerge.core import Document

from ._errors import InvalidSyncMessage, LocalError
from ._sync import Replica, decode_sync_message

Changes = list[tuple[bytes, bytes]]

DEFAULT_MAX_ROUNDS = 12
DEFAULT_MAX_BYTES = 256 * 1024


@dataclass(frozen=True)
class SyncRound:
    """One request of an exchange: a message (or None: "nothing to say, but answer") per document."""

    msgs: dict[str, bytes | None]
    reset: tuple[str, ...] = ()
    """Documents whose sync state the responder must drop first (only in the first request)."""


@dataclass
class Applied:
    """What applying one side's messages did.

    Attributes:
        changes: (doc id, new changes) for every document that gained changes, in
            order: the caller makes them durable before it acknowledges or answers.
        errors: doc id -> why its message was refused (its sync state was dropped).
        created: documents this side did not hold before (adopted after `validate`).
        unchanged: documents whose message applied but brought nothing new.
        damaged: existing documents that `check_changed` refused after the changes
            were applied (the live document holds them: the caller restores it).
        unexpected: documents the peer wrote about without being asked (ignored).
    """

    changes: list[tuple[str, Changes]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)
    unchanged: list[str] = field(default_factory=list)
    damaged: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)


Validate = Callable[[str, Document], Any]
"""Checks a document: (doc id, document); raises to refuse it."""


class _Book(Protocol):
    def reset(self, peer: str, doc_id: str) -> None: ...


class SyncReplica(Protocol):
    """What a `SyncSession` works on: a `Replica`, or a view that routes some
    documents elsewhere (the node sends archived ones to a read-only copy)."""

    @property
    def docs(self) -> Mapping[str, Document]: ...

    @property
    def book(self) -> _Book: ...

    def generate(self, peer: str, doc_id: str) -> bytes | None: ...

    def receive(
        self, peer: str, doc_id: str, data: bytes, *, validate: Callable[[Document], None] | None = None
    ) -> Changes: ...


class SyncSession:
    """Both sides of an Automerge sync exchange with one peer over a batch of documents.

    Args:
        replica: the documents and the per-(peer, document) sync states. Anything with
            `docs`, `book.reset`, `generate` and `receive` like `Replica` will do (a node
            can route archived documents to a read-only copy).
        peer: the other side's id (the key of its sync states).
        max_rounds: requests per exchange (initiator).
        max_bytes: sync-message bytes per request (initiator).
        validate: checks a document received for the first time before it is adopted.
        check_changed: checks an existing document after a message changed it; a
            refusal reports the document as `damaged` and refused.
    """

    def __init__(
        self,
        replica: SyncReplica | Replica,
        peer: str,
        *,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        validate: Validate | None = None,
        check_changed: Validate | None = None,
    ) -> None:
        if max_rounds < 1 or max_bytes < 1:
            raise LocalError("max_rounds and max_bytes must be at least 1")
        self.replica = replica
        self.peer = peer
        self.max_rounds = max_rounds
        self.max_bytes = max_bytes
        self.validate = validate
        self.check_changed = check_changed
        self.rounds = 0
        self.docs: tuple[str, ...] = ()
        self.refused: dict[str, str] = {}
        self._pending: list[str] = []
        self._held: dict[str, bytes] = {}
        self._reset: tuple[str, ...] = ()
        self._sent: dict[str, bytes | None] | None = None
        self._truncated = False
        self._done = True

    # --- initiator ----------------------------------------------------------------------

    def begin(self, doc_ids: Sequence[str], *, reset: Iterable[str] | bool = ()) -> None:
        """Start an exchange about `doc_ids`.

        Args:
            reset: documents (True: all of them) whose sync states start afresh on
                both sides: ours now, the peer's with the first request.
        """
        self.docs = tuple(dict.fromkeys(doc_ids))
        wanted = self.docs if reset is True else () if reset is False else tuple(reset)
        self._reset = tuple(d for d in dict.fromkeys(wanted))
        for doc_id in self._reset:
            self.replica.book.reset(self.peer, doc_id)
        self._pending = list(self.docs)
        self._held = {}
        self._sent = None
        self._truncated = False
        self.refused = {}
        self.rounds = 0
        self._done = not self.docs

    def next_request(self) -> SyncRound | None:
        """The next request to send, or None when the exchange is over (see `synced`, `unsettled`)."""
        if self._done:
            return None
        if self.rounds >= self.max_rounds:
            self._done = True
            for doc_id in self._held:  # generated, never sent: the state must not think it was
                self.replica.book.reset(self.peer, doc_id)
            self._held.clear()
            return None
        msgs: dict[str, bytes | None] = {}
        size = 0
        for doc_id in self._pending:
            msg = self._held.pop(doc_id) if doc_id in self._held else self.replica.generate(self.peer, doc_id)
            if msg is not None and size > 0 and size + len(msg) > self.max_bytes:
                self._held[doc_id] = msg  # rule 4: sent with the next request
                continue
            msgs[doc_id] = msg
            size += len(msg) if msg is not None else 0
        first = self.rounds == 0
        if not first and not self._held and not self._truncated and all(m is None for m in msgs.values()):
            self._done = True  # rule 1: nobody had anything to say
            self._pending = []
            return None
        self.rounds += 1
        self._sent = msgs
        return SyncRound(msgs, self._reset if first else ())

    def on_reply(self, msgs: Mapping[str, bytes | None], errors: Mapping[str, str]) -> Applied:
        """Apply the peer's answer to the last request; returns the changes to make durable."""
        if self._sent is None:
            raise LocalError("on_reply without a request in flight")
        sent, self._sent = self._sent, None
        applied = Applied()
        for doc_id, error in errors.items():
            if doc_id not in sent:
                applied.unexpected.append(doc_id)
                continue
            self.replica.book.reset(self.peer, doc_id)
            self.refused[doc_id] = f"refused by the peer: {error}"
            applied.errors[doc_id] = str(error)
        wanted = {d: m for d, m in msgs.items() if d in sent and d not in applied.errors}
        applied.unexpected.extend(d for d in msgs if d not in sent)
        self._apply(wanted, applied)
        for doc_id, error in applied.errors.items():
            self.refused.setdefault(doc_id, f"bad sync message from the peer: {error}")
        # A reply that reached the byte cap may have left documents out (the responder
        # stops generating there, rule 6): they stay for the next request.
        self._truncated = sum(len(m) for m in msgs.values() if m is not None) >= self.max_bytes
        self._pending = [
            d for d in self._pending
            if d not in self.refused
            and (d in self._held or sent.get(d) is not None or d in msgs or (self._truncated and d in sent))
        ]  # fmt: skip
        if not self._pending:
            self._done = True
        return applied

    def abort(self) -> None:
        """The exchange failed part-way: drop every sync state of the batch (rule 3)."""
        for doc_id in self.docs:
            self.replica.book.reset(self.peer, doc_id)
        self._held.clear()
        self._sent = None
        self._done = True

    @property
    def done(self) -> bool:
        return self._done

    @property
    def unsettled(self) -> tuple[str, ...]:
        """Documents still talking when the round limit ended the exchange."""
        return tuple(self._pending) if self._done else ()

    @property
    def synced(self) -> tuple[str, ...]:
        """Documents that are in step with the peer (neither refused nor unsettled)."""
        if not self._done:
            return ()
        out = set(self.refused) | set(self._pending)
        return tuple(d for d in self.docs if d not in out)

    # --- responder ----------------------------------------------------------------------

    def check(self, msgs: Mapping[str, bytes | None]) -> None:
        """Parse every message first, so a request can be refused whole before anything changes.

        Raises:
            InvalidSyncMessage: naming the first document whose message does not parse.
        """
        for doc_id, msg in msgs.items():
            if msg is not None:
                try:
                    decode_sync_message(msg)
                except InvalidSyncMessage as exc:
                    raise InvalidSyncMessage(f"sync message for {doc_id!r}: {exc}") from exc

    def on_request(self, msgs: Mapping[str, bytes | None], reset: Iterable[str] = ()) -> Applied:
        """Apply an initiator's request: drop the states it asked to reset, then apply its messages."""
        for doc_id in reset:
            self.replica.book.reset(self.peer, doc_id)
        applied = Applied()
        self._apply(msgs, applied)
        return applied

    def replies(
        self, doc_ids: Iterable[str], errors: Mapping[str, str] | None = None, *, max_bytes: int | None = None
    ) -> dict[str, bytes]:
        """Our answer: the next message for every requested document not refused (None left out).

        Args:
            max_bytes: stop generating once the answer holds this many bytes of
                messages (a message generated counts as sent in its sync state, so
                none is generated and then dropped); the documents left out get
                theirs with the initiator's next request. One message always goes.
        """
        out: dict[str, bytes] = {}
        size = 0
        for doc_id in sorted(doc_ids):
            if errors and doc_id in errors:
                continue
            if max_bytes is not None and size >= max_bytes:
                break
            msg = self.replica.generate(self.peer, doc_id)
            if msg is not None:
                out[doc_id] = msg
                size += len(msg)
        return out

    # --- both -----------------------------------------------------------------------------

    def _apply(self, msgs: Mapping[str, bytes | None], applied: Applied) -> None:
        replica, peer = self.replica, self.peer
        for doc_id, msg in sorted(msgs.items()):
            if msg is None:
                continue
            existed = doc_id in replica.docs
            validate = functools.partial(self.validate, doc_id) if self.validate is not None else None
            try:
                changes = replica.receive(peer, doc_id, msg, validate=validate)
            except InvalidSyncMessage as exc:  # receive() has dropped the state already
                applied.errors[doc_id] = str(exc)
                continue
            if changes and existed and self.check_changed is not None:
                try:
                    self.check_changed(doc_id, replica.docs[doc_id])
                except Exception as exc:  # noqa: BLE001 - whatever the caller's check raises refuses it
                    replica.book.reset(peer, doc_id)
                    applied.errors[doc_id] = str(exc)
                    applied.damaged.add(doc_id)
                    continue
            if changes:
                applied.changes.append((doc_id, changes))
                if not existed:
                    applied.created.add(doc_id)
            else:
                applied.unchanged.append(doc_id)
