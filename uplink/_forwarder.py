"""The forwarder: the leader sends the mesh's session documents to the cloud.

Two halves, as everywhere in this project:

- `ForwardPlanner` (sans-IO) decides *what* to send first and *when* to try again.
  It is told about changes (`note_change`), confirmations (`note_synced`) and the
  outcome of each batch (`on_success`, `on_failure`), and answers `next_batch(now)`
  and `next_deadline()`. No clock, no I/O; randomness from an injected
  `random.Random`, so a seeded run is reproducible.
- `Forwarder` (thin I/O) runs one batch as Automerge sync rounds with the cloud
  over `CloudClient.sync`, applies what the cloud sends back (its receipts) and
  hands those changes to the node's `persist` callback. `serve_forwarder` is the
  trio task around it.

The cloud is one more Automerge sync peer (`uplink._wire`): the leader keeps one
sync state per document under the peer key ``"cloud"``, the cloud one per (leader,
document). Automerge sync is idempotent, so a batch that is re-sent after a lost
response, or sent by two leaders at once, changes nothing on the cloud the second
time. That is why a failure handling here can be blunt: drop the sync states of the
batch, tell the cloud to drop its own (``reset``), and run the same batch again.

Order (why state changes go first): a `stop` decides what the driver pays and a
`start`/`authorize` that the cloud has not seen leaves an operator blind to a
charger in use, while one more meter reading of a session still charging changes
nothing that anyone acts on until the session stops. So priority 0 (a new document
or a state change) goes before priority 1 (only new meter readings), and within a
priority the oldest unconfirmed change first, so nothing starves.

Retries: exponential backoff with full jitter (delay uniform in
``[0, min(60, 1 * 2**n)]`` after the n-th failure in a row, n from 0), as DESIGN.md
sets, so a site whose uplink returns does not have all its retries land together
and a cloud that is down is asked about once a minute at most. A document the cloud
refuses (it answers the rest of the batch) or whose sync does not settle within
the round limit is set aside with its own backoff (`defer`), so one bad document
delays only itself.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import cbor2
import nacl.signing
import trio
from automerge.core import Document

from crdt import SITE_CONFIG_ID, Replica, SessionView, SyncSession, heads_hash, read_session

from ._probe import CloudClient, CloudRefused, UplinkError
from ._wire import MAX_BATCH_BYTES, MAX_DOCS, CloudSyncRequest, WireError

log = logging.getLogger("uplink.forwarder")

PRIORITY_STATE = 0
"""A new document, or a change of the session's state (authorize, start, pause, resume, stop, receipt)."""
PRIORITY_METER = 1
"""Only new meter readings (or notes): the session's state is as the cloud last saw it."""
CLOUD_PEER = "cloud"
"""The key of the cloud's sync states in the node's `SyncBook` (no mesh node may use this id)."""
CONFIRM_SIZE = 512
"""Size hint for a document the cloud probably has already: heads and a bloom filter."""

Changes = list[tuple[bytes, bytes]]
Persist = Callable[[list[tuple[str, Changes]]], Awaitable[None]]


def change_priority(before: SessionView | None, after: SessionView) -> int:
    """The forwarding priority of a change, from the session's fold before and after it.

    Args:
        before: the fold before the change, or None for a document new to this node.
        after: the fold after it.
    """
    if before is None or before.state != after.state:
        return PRIORITY_STATE
    return PRIORITY_METER


@dataclass(frozen=True)
class ForwardCounters:
    """Forwarding counters for the status page and metrics.

    Attributes:
        bytes_sent: request bodies (compressed, as on the wire) of exchanges the cloud
            answered; a request whose answer never came is not counted.
        batches: batches that completed (every round answered).
        failures: batches that failed (the cloud refused the request, or did not answer).
        documents_waiting: documents the cloud may lack (not confirmed since their
            last change, or since this node became leader).
        deferred: times a single document was set aside (refused by the cloud, or
            its sync did not settle within the round limit).
    """

    bytes_sent: int
    batches: int
    failures: int
    documents_waiting: int
    deferred: int


@dataclass
class _Late:
    """Changes noted while their document was out in a batch (see invariant 3)."""

    priority: int
    seq: int
    size: int


@dataclass
class _Waiting:
    priority: int
    seq: int  # order of the oldest change the cloud has not confirmed
    size: int
    not_before: float = -math.inf
    deferrals: int = 0
    late: _Late | None = None


class ForwardPlanner:
    """Which documents the cloud may lack, which to send first, and when to retry (sans-IO).

    Invariants:

    1. A document is *waiting* from its first noted change until `note_synced`, and
       again after `reset_all`. `documents_waiting` is the number of waiting documents.
    2. `next_batch` orders waiting documents by ``(priority, seq)``: priority 0 first,
       then the oldest unconfirmed change (``seq`` is a counter, so ties cannot occur
       and no clock is needed); it adds them while their size hints fit in
       `max_bytes` and stops at the first that does not (a first document that is
       larger than the bound goes alone). It returns None while backing off.
    3. A change noted while its document is out in a batch is not covered by that
       batch's confirmation: `note_synced` then leaves the document waiting with
       just the late changes.
    4. Failures in a row ``n`` (from 0) give a delay uniform in
       ``[0, min(max_delay, base_delay * 2**n)]``; `on_success` ends the series.
    5. `next_deadline` is None when nothing waits, else the earliest time
       `next_batch` may return documents (at or before the present means now).
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        max_bytes: int = MAX_BATCH_BYTES,
        max_docs: int = MAX_DOCS,
        meter_hold: float = 0.0,
    ) -> None:
        if meter_hold < 0:
            raise ValueError("meter_hold must not be negative")
        self.meter_hold = meter_hold
        if base_delay <= 0 or max_delay < base_delay:
            raise ValueError("need 0 < base_delay <= max_delay")
        if max_bytes <= 0 or not 0 < max_docs <= MAX_DOCS:
            raise ValueError(f"max_bytes must be positive and max_docs in 1..{MAX_DOCS}")
        self._rng = rng
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_bytes = max_bytes
        self.max_docs = max_docs
        self._known: set[str] = set()
        self._waiting: dict[str, _Waiting] = {}
        self._handed: set[str] = set()
        self._seq = 0
        self._failures_in_row = 0
        self._retry_at = -math.inf
        self._bytes_sent = 0
        self._batches = 0
        self._failures = 0
        self._deferred = 0

    # --- inputs -------------------------------------------------------------------------

    def note_change(self, doc_id: str, priority: int, size_hint: int, now: float | None = None) -> None:
        """A document changed on this node (locally or from a peer); the cloud may lack it.

        Args:
            priority: `PRIORITY_STATE` (0) or `PRIORITY_METER` (1), see `change_priority`.
            now: when given, a meter-only change waits `meter_hold` seconds before it
                is due, so that readings taken meanwhile travel in the same exchange
                (egress on a 4G uplink costs money); a state change is due at once
                and takes the document's held readings with it.
            size_hint: about how many bytes of changes the cloud may lack because of this
                change (the sizes of the new changes; the saved size for a document seen
                for the first time). Hints of a waiting document add up.
        """
        if priority not in (PRIORITY_STATE, PRIORITY_METER):
            raise ValueError(f"priority must be {PRIORITY_STATE} or {PRIORITY_METER}")
        if size_hint < 0:
            raise ValueError("size_hint must not be negative")
        self._known.add(doc_id)
        entry = self._waiting.get(doc_id)
        hold = now + self.meter_hold if now is not None and priority == PRIORITY_METER else -math.inf
        if entry is None:
            self._waiting[doc_id] = _Waiting(priority, self._next_seq(), size_hint, not_before=hold)
            return
        if priority == PRIORITY_STATE and entry.deferrals == 0:
            entry.not_before = -math.inf
        entry.priority = min(entry.priority, priority)
        entry.size += size_hint
        if doc_id in self._handed:
            if entry.late is None:
                entry.late = _Late(priority, self._next_seq(), 0)
            entry.late.priority = min(entry.late.priority, priority)
            entry.late.size += size_hint

    def note_synced(self, doc_id: str) -> None:
        """The cloud has this node's version of the document (as of when its batch went out)."""
        self._handed.discard(doc_id)
        entry = self._waiting.pop(doc_id, None)
        if entry is not None and entry.late is not None:
            late = entry.late
            self._waiting[doc_id] = _Waiting(late.priority, late.seq, late.size)

    def defer(self, doc_id: str, now: float) -> float:
        """Set one document aside: the cloud refused it, or its sync did not settle.

        It stays waiting, but `next_batch` skips it until the returned time, with a
        backoff of its own (same formula as invariant 4, counted per document).
        """
        entry = self._waiting.get(doc_id)
        self._handed.discard(doc_id)
        if entry is None:
            return now
        entry.late = None
        entry.not_before = now + self._delay(entry.deferrals)
        entry.deferrals += 1
        self._deferred += 1
        return entry.not_before

    def forget(self, doc_id: str) -> None:
        """Stop tracking a document (pruned after its retention, or gone from the replica)."""
        self._known.discard(doc_id)
        self._waiting.pop(doc_id, None)
        self._handed.discard(doc_id)

    def note_sent(self, nbytes: int) -> None:
        """Count a request body that the cloud answered."""
        self._bytes_sent += nbytes

    def on_success(self, now: float) -> None:
        """The last batch completed: end the backoff; the next batch may go at once."""
        self._failures_in_row = 0
        self._retry_at = now
        self._batches += 1
        self._end_batch()

    def on_failure(self, now: float) -> float:
        """The last batch failed: back off. Returns the time of the next attempt."""
        self._retry_at = now + self._delay(self._failures_in_row)
        self._failures_in_row += 1
        self._failures += 1
        self._end_batch()
        return self._retry_at

    def reset_all(self) -> None:
        """This node has just become leader: every document waits until the cloud confirms it.

        Documents still waiting keep their priority and age; documents that were
        confirmed earlier (maybe under another leader, maybe before the cloud lost
        something) wait behind them at `PRIORITY_METER` with a small size hint, since
        confirming a document the cloud holds costs a few hundred bytes. The backoff
        and every per-document deferral start afresh.
        """
        self._handed.clear()
        self._failures_in_row = 0
        self._retry_at = -math.inf
        for entry in self._waiting.values():
            entry.not_before = -math.inf
            entry.deferrals = 0
            entry.late = None
        for doc_id in sorted(self._known - self._waiting.keys()):
            self._waiting[doc_id] = _Waiting(PRIORITY_METER, self._next_seq(), CONFIRM_SIZE)

    # --- decisions ----------------------------------------------------------------------

    def next_batch(self, now: float, max_bytes: int | None = None) -> list[str] | None:
        """The documents to send now, most important first (invariant 2).

        Returns:
            None while backing off; an empty list when nothing is waiting (or every
            waiting document is deferred); otherwise the batch.
        """
        if now < self._retry_at:
            return None
        limit = self.max_bytes if max_bytes is None else max_bytes
        ready = sorted((e.priority, e.seq, d) for d, e in self._waiting.items() if e.not_before <= now)
        batch: list[str] = []
        total = 0
        for _, _, doc_id in ready:
            size = self._waiting[doc_id].size
            if batch and (total + size > limit or len(batch) >= self.max_docs):
                break
            batch.append(doc_id)
            total += size
        self._end_batch()
        self._handed.update(batch)
        return batch

    def next_deadline(self) -> float | None:
        """When `next_batch` may next return documents (invariant 5)."""
        if not self._waiting:
            return None
        earliest = min(e.not_before for e in self._waiting.values())
        return max(self._retry_at, earliest)

    def is_waiting(self, doc_id: str) -> bool:
        return doc_id in self._waiting

    def confirm(self, doc_ids: Iterable[str]) -> None:
        """These documents wait again, behind everything else, for a cheap confirmation."""
        for doc_id in doc_ids:
            if doc_id in self._known and doc_id not in self._waiting:
                self._waiting[doc_id] = _Waiting(PRIORITY_METER, self._next_seq(), CONFIRM_SIZE)

    def waiting(self) -> dict[str, int]:
        """Every waiting document and its priority (for metrics)."""
        return {doc_id: entry.priority for doc_id, entry in self._waiting.items()}

    @property
    def counters(self) -> ForwardCounters:
        return ForwardCounters(
            bytes_sent=self._bytes_sent,
            batches=self._batches,
            failures=self._failures,
            documents_waiting=len(self._waiting),
            deferred=self._deferred,
        )

    # --- helpers ------------------------------------------------------------------------

    def _delay(self, n: int) -> float:
        return self._rng.uniform(0.0, min(self.max_delay, self.base_delay * 2.0 ** min(n, 64)))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _end_batch(self) -> None:
        for doc_id in self._handed:
            entry = self._waiting.get(doc_id)
            if entry is not None:
                entry.late = None
        self._handed.clear()


# --- signed requests -----------------------------------------------------------------------

SIGNED_SYNC_CONTEXT = b"meshnode/cloud-sync/v1\x00"
"""Domain separation for the signature over a sync request (no other signed thing verifies as one)."""


@dataclass(frozen=True)
class DeviceCredential:
    """What a node signs its sync requests with: its device key and the certificate that
    vouches for it (bytes the cloud checks against the site key; opaque here)."""

    signing_key: nacl.signing.SigningKey = field(repr=False)
    certificate: bytes = field(repr=False)


@dataclass(frozen=True)
class SignedSyncRequest(CloudSyncRequest):
    """A sync request signed by the sending node's device key.

    On the wire (inside the deflated body, in place of the plain request)::

        {"v": 1, "signed": CBOR {"ts": seconds, "req": the plain request's CBOR},
         "cert": the node's certificate, "sig": Ed25519(SIGNED_SYNC_CONTEXT || signed)}

    The cloud checks the certificate against the site key and the site's
    revocations, the signature with the certificate's key, `ts` against its clock,
    and that the request's `node` is the certificate's node (docs/security.md).
    """

    credential: DeviceCredential | None = field(default=None, repr=False)
    ts: float = 0.0

    def encode(self) -> bytes:
        plain = super().encode()
        if self.credential is None:
            return plain
        signed = cbor2.dumps({"ts": float(self.ts), "req": plain}, canonical=True)
        sig = self.credential.signing_key.sign(SIGNED_SYNC_CONTEXT + signed).signature
        return cbor2.dumps({"v": 1, "signed": signed, "cert": self.credential.certificate, "sig": sig}, canonical=True)


# --- the I/O side ------------------------------------------------------------------------


class _PersistFailed(Exception):
    """Our own store could not keep what the cloud sent; the batch counts as failed."""


@dataclass(frozen=True)
class _Outcome:
    synced: tuple[str, ...]
    deferred: tuple[tuple[str, str], ...]  # (doc_id, why)
    refused: frozenset[str]  # their sync states were dropped


class Forwarder:
    """Runs the planner's batches against the cloud (thin I/O; the decisions are the planner's).

    Args:
        replica: the node's replica; the cloud's sync states live in its book under `peer`.
        node_id, site: this node, as the cloud files its batches.
        client: the cloud client.
        planner: the planner this forwarder reports to.
        persist: makes changes received from the cloud durable and announces them to
            the mesh (the node's store-then-notify path). Called once per round that
            brought changes, before the documents are confirmed.
        peer: the sync-state key of the cloud.
        timeout: seconds allowed for one POST.
        max_rounds: sync rounds per batch; a document still talking after that is deferred.
        validate: checks a document the cloud would create on this node (it should
            never do that: the leader only asks about documents it holds).
        clock: read after an exchange, to time the backoff from when it ended.
    """

    def __init__(
        self,
        replica: Replica,
        node_id: str,
        site: str,
        client: CloudClient,
        planner: ForwardPlanner,
        persist: Persist,
        *,
        peer: str = CLOUD_PEER,
        timeout: float = 20.0,
        max_rounds: int = 8,
        validate: Callable[[Document], object] = read_session,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")
        self.replica = replica
        self.node_id = node_id
        self.site = site
        self.client = client
        self.planner = planner
        self.persist = persist
        self.peer = peer
        self.timeout = timeout
        self.max_rounds = max_rounds
        self.validate = validate
        self._clock = clock
        # Documents whose cloud sync state on both sides came out of a completed exchange.
        # Any other document starts its next exchange with a reset on both sides.
        self._established: set[str] = set()
        self._wakeup = trio.Event()
        self._site_config_heads: bytes | None = None
        self._credential: DeviceCredential | None = None
        self._wall_clock: Callable[[], float] = time.time

    def sign_with(
        self, signing_key: nacl.signing.SigningKey, certificate: bytes, wall_clock: Callable[[], float] = time.time
    ) -> None:
        """Sign every sync request with this node's device key from now on (`SignedSyncRequest`):
        a cloud that trusts a site accepts sync only from the site's certified devices."""
        self._credential = DeviceCredential(signing_key, bytes(certificate))
        self._wall_clock = wall_clock

    # --- node-facing ----------------------------------------------------------------------

    def note_change(self, doc_id: str, priority: int, size_hint: int) -> None:
        """Tell the planner about a change and wake the forwarding task."""
        self.planner.note_change(doc_id, priority, size_hint, now=self._clock())
        self.poke()

    def poke(self) -> None:
        """Wake `serve_forwarder` now (a change, or leadership may have moved)."""
        self._wakeup.set()

    @property
    def counters(self) -> ForwardCounters:
        return self.planner.counters

    def start_leading(self) -> None:
        """Begin a leadership term: every document waits, every cloud sync state starts fresh."""
        self._drop_all_states()
        self.planner.reset_all()

    def stop_leading(self) -> None:
        """End a leadership term: the cloud sync states are of no use until the next one."""
        self._drop_all_states()

    # --- one batch ------------------------------------------------------------------------

    async def forward_once(self, now: float) -> bool:
        """Run one batch, if the planner has one at `now`.

        Returns:
            True when a batch completed (more may be waiting: call again); False when
            there was nothing to send, the planner is backing off, or the batch failed.
        """
        self._note_site_config()
        batch = self.planner.next_batch(now)
        if not batch:
            return False
        docs: list[str] = []
        for doc_id in batch:
            if doc_id in self.replica.docs:
                docs.append(doc_id)
            else:
                log.info("not forwarding %s: this node no longer holds it", doc_id)
                self.planner.forget(doc_id)
        if not docs:
            return False
        reset = [d for d in docs if d not in self._established]
        for doc_id in reset:
            self.replica.book.reset(self.peer, doc_id)
        try:
            outcome = await self._exchange(docs, reset)
        except (UplinkError, WireError, _PersistFailed) as exc:
            self._drop_states(docs)
            retry_at = self.planner.on_failure(self._clock())
            self._log_failure(exc, len(docs), retry_at)
            return False
        except BaseException:
            # Cancelled (leadership moved, shutdown) or a bug: the exchange stopped
            # part-way, so neither side's sync state can be trusted.
            self._drop_states(docs)
            raise
        finished = self._clock()
        for doc_id in outcome.synced:
            self.planner.note_synced(doc_id)
        for doc_id, why in outcome.deferred:
            log.info("deferring %s: %s", doc_id, why)
            self.planner.defer(doc_id, finished)
        # Refused documents had their states dropped; every other one is now in step.
        self._established.update(d for d in docs if d not in outcome.refused)
        self.planner.on_success(finished)
        log.debug("forwarded %d documents (%d deferred)", len(outcome.synced), len(outcome.deferred))
        return True

    async def _exchange(self, docs: list[str], reset: Sequence[str]) -> _Outcome:
        """Sync rounds for `docs` until neither side has anything to say, or the round limit.

        The exchange itself is `crdt.SyncSession` (the same one the cloud answers with);
        this only moves its requests over HTTPS and persists what comes back.
        """
        session = SyncSession(
            self.replica, self.peer, max_rounds=self.max_rounds, max_bytes=MAX_BATCH_BYTES,
            validate=lambda _doc_id, doc: self.validate(doc),
        )  # fmt: skip
        session.begin(docs, reset=reset)  # the caller has dropped our states already
        while (step := session.next_request()) is not None:
            request: CloudSyncRequest = CloudSyncRequest(self.node_id, self.site, step.msgs, step.reset)
            if self._credential is not None:
                request = SignedSyncRequest(
                    self.node_id, self.site, step.msgs, step.reset, credential=self._credential, ts=self._wall_clock()
                )
            response, sent = await self.client.sync(request, self.timeout)
            self.planner.note_sent(sent)
            applied = session.on_reply(response.msgs, response.errors)
            for doc_id in applied.unexpected:
                log.warning("cloud wrote about %s, which we did not ask about", doc_id)
            for doc_id, error in applied.errors.items():
                log.warning("cloud refused, or sent a bad sync message for, %s: %s", doc_id, error)
            if applied.changes:
                try:
                    await self.persist(applied.changes)
                except Exception as exc:
                    raise _PersistFailed(f"could not persist changes from the cloud: {exc}") from exc
        deferred = dict(session.refused)
        for doc_id in session.unsettled:
            deferred[doc_id] = f"sync did not settle within {self.max_rounds} rounds"
        return _Outcome(
            synced=tuple(d for d in docs if d not in deferred),
            deferred=tuple(deferred.items()),
            refused=frozenset(session.refused),
        )

    # --- helpers --------------------------------------------------------------------------

    def _note_site_config(self) -> None:
        """The site config goes to the cloud too (its signed tariffs price the sessions).

        Checked before each batch: the node tells the forwarder about session changes
        only, and the config changes rarely. When it changes again later, every session
        without a receipt waits for a (cheap) confirmation behind it, so sessions the
        cloud could not price before come back with their receipts.
        """
        doc = self.replica.docs.get(SITE_CONFIG_ID)
        if doc is None:
            return
        hh = heads_hash(doc.get_heads())
        if hh == self._site_config_heads:
            return
        first = self._site_config_heads is None
        self._site_config_heads = hh
        self.planner.note_change(SITE_CONFIG_ID, PRIORITY_STATE, len(doc.save()))
        if not first:
            unreceipted = []
            for doc_id, session_doc in sorted(self.replica.docs.items()):
                if doc_id == SITE_CONFIG_ID or self.planner.is_waiting(doc_id):
                    continue
                try:
                    if read_session(session_doc).receipt is None:
                        unreceipted.append(doc_id)
                except Exception:
                    continue
            self.planner.confirm(unreceipted)

    def _drop_states(self, docs: Iterable[str]) -> None:
        for doc_id in docs:
            self.replica.book.reset(self.peer, doc_id)
            self._established.discard(doc_id)

    def _drop_all_states(self) -> None:
        self.replica.book.forget_peer(self.peer)
        self._established.clear()

    def _log_failure(self, exc: Exception, ndocs: int, retry_at: float) -> None:
        delay = max(0.0, retry_at - self._clock())
        if isinstance(exc, _PersistFailed):
            log.error("forwarding %d documents failed: %s; retry in %.1f s", ndocs, exc, delay, exc_info=exc)
        elif isinstance(exc, CloudRefused) and 400 <= exc.status < 500:
            log.warning("cloud refused a batch of %d documents: %s; retry in %.1f s", ndocs, exc, delay)
        elif isinstance(exc, WireError):
            log.warning("cloud answered a batch with garbage: %s; retry in %.1f s", exc, delay)
        else:
            log.info("forwarding %d documents failed: %s; retry in %.1f s", ndocs, exc, delay)

    async def wait_until(self, deadline: float) -> None:
        """Sleep until `deadline` or a `poke`, whichever comes first."""
        with trio.move_on_at(deadline):
            await self._wakeup.wait()
        if self._wakeup.is_set():
            self._wakeup = trio.Event()


async def serve_forwarder(
    forwarder: Forwarder,
    *,
    is_leader: Callable[[], bool],
    recheck: float = 1.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward while this node leads. Runs until cancelled.

    Sleeps until the planner's deadline, a `Forwarder.poke`, or `recheck` seconds,
    whichever comes first; then asks `is_leader()`. Becoming leader starts a term
    (`Forwarder.start_leading`: everything waits until the cloud confirms it);
    losing the role ends it. A batch already in flight when the role moves is
    finished: two leaders cost egress, never correctness (DESIGN.md). Polling
    every `recheck` seconds means the node need not poke on every change of the
    election, though poking makes the handover prompt.
    """
    task_status.started()
    leading = False
    try:
        while True:
            if is_leader() != leading:
                leading = not leading
                if leading:
                    log.info("leading: forwarding to the cloud")
                    forwarder.start_leading()
                else:
                    log.info("no longer leading: forwarding stops")
                    forwarder.stop_leading()
            if leading and await forwarder.forward_once(trio.current_time()):
                continue
            wake_at = trio.current_time() + recheck
            deadline = forwarder.planner.next_deadline() if leading else None
            if deadline is not None:
                wake_at = min(wake_at, deadline)
            await forwarder.wait_until(wake_at)
    finally:
        if leading:
            forwarder.stop_leading()
