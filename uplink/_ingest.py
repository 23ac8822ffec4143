"""Ingestion: the reconciliation of everything one sync request changed, as one batch.

`reconcile_batch` runs inside the request's one database transaction, after the
service took its locks (`CloudService._catch_up`). What it decides is what
docs/cloud.md ("Ingestion") lists per session: keys, verification, the
cross-session chain check, the billing fold, the price, the receipt. How it does
it is set-based: every phase runs over all documents of the request before the
next one, so the database sees a fixed number of statements per request, not per
session (docs/cloud.md "Ingest cost" has the profile that asked for it):

    reads   device keys, ledger rows, known events, chain neighbours, stored events
            of sessions already in the ledger, conflict counts      (one each)
    writes  device pins, events, changed `applied` flags, conflicts, ledger rows,
            documents                                                (one executemany each)

Each event is decoded once per process and its signature checked once per key
(`crdt.EVENT_CACHE`: `parse` for the devices a session names, `verify` in the
fold), each document read once per version (`SessionReader`), and a document is
saved only when its heads differ from what this process last stored.

Exactly-once does not depend on the batching: the ledger rows are read inside the
transaction that writes them (after the locks), so a session that holds a receipt
is never issued another; events, conflicts and pins are keyed by content (`ON
CONFLICT DO NOTHING`); and the transaction commits all of the request or none of
it. Decisions that used to follow each other session by session still do, in
memory: a key pinned by one session of the batch binds the next ones, and the chain
check sees every new event of the batch at once (`check_chains` takes them in
(device, seq, event id) order, so inside one request the earlier link of a device's
chain is the anchor, whichever session carries it).

The pure decisions the batch uses (`check_chains`, `session_keys`) live here too;
`_cloud.py` re-exports them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from automerge.core import Document

from crdt import (
    EVENT_CACHE,
    GENESIS_PREV,
    DocumentError,
    EventError,
    Keyring,
    SessionData,
    SignedEvent,
    fold,
    heads_hash,
    read_session,
)

from ._ledger import Tx
from ._tariffs import PriceDecision

# Event status in the `events` table.
OK = "ok"
LATE = "late"
FORK = "fork"
BROKEN_CHAIN = "broken_chain"
_ACCEPTED = (OK, LATE)

# Conflict kinds the cloud adds to the fold's own (see docs/data-model.md).
KEY_MISMATCH = "key_mismatch"
FOREIGN_RECEIPT = "foreign_receipt"
EVENT_REMOVED = "event_removed"
_FOLD_INPUT_KINDS = ("invalid_event", "wrong_session")


# --- the cross-session chain ---------------------------------------------------------


@dataclass(frozen=True)
class ChainLink:
    """An event as the cross-session chain check sees it."""

    event_id: str
    device_id: str
    seq: int
    prev: bytes
    chain_hash: bytes
    session_id: str
    status: str = OK

    @classmethod
    def of(cls, event: SignedEvent) -> ChainLink:
        r = event.record
        return cls(r.event_id, r.device_id, r.seq, r.prev, event.chain_hash, r.session_id)


@dataclass(frozen=True)
class ChainVerdict:
    event_id: str
    status: str  # OK, FORK or BROKEN_CHAIN
    detail: str = ""


def check_chains(new: Iterable[ChainLink], stored: Iterable[ChainLink]) -> list[ChainVerdict]:
    """Decide where new events stand in their devices' chains, across sessions.

    Args:
        new: events the cloud has not stored yet.
        stored: stored events (with their status) in every slot (device, seq)
            next to or at a new event's: seq - 1, seq, seq + 1.

    Rules, applied to new events in (device, seq, event_id) order so that a
    batch decides the same way whatever order it arrived in, and each decided
    event counts for the next:

    1. A slot that already holds an accepted event (`ok` or `late`) with another
       id: `fork`. Inside one batch the smaller event_id wins, as in the fold.
    2. seq 1 whose `prev` is not zeros, or a `prev` that is not the chain hash
       of the accepted event at seq - 1: `broken_chain`.
    3. No accepted event at seq - 1 but a refused one whose chain hash is `prev`:
       it extends a refused event, `broken_chain`.
    4. The accepted event at seq + 1 does not point at this one: `broken_chain`
       (the newcomer loses; what was accepted, and perhaps billed, stays).
    5. Otherwise `ok`. A link whose neighbour is unknown cannot be checked yet;
       it is checked when the neighbour arrives (rule 4 or 2).
    """
    slots: dict[tuple[str, int], list[ChainLink]] = {}
    for link in stored:
        slots.setdefault((link.device_id, link.seq), []).append(link)
    verdicts: list[ChainVerdict] = []
    for link in sorted(new, key=lambda e: (e.device_id, e.seq, e.event_id)):
        device, seq = link.device_id, link.seq

        def accepted(s: int) -> ChainLink | None:
            return next((e for e in slots.get((device, s), []) if e.status in _ACCEPTED), None)

        here, before, after = accepted(seq), accepted(seq - 1), accepted(seq + 1)
        refused_before = [e for e in slots.get((device, seq - 1), []) if e.status not in _ACCEPTED]
        if here is not None and here.event_id != link.event_id:
            verdict = ChainVerdict(
                link.event_id, FORK,
                f"device {device!r} seq {seq} is already event {here.event_id} (session {here.session_id!r})",
            )  # fmt: skip
        elif seq == 1 and link.prev != GENESIS_PREV:
            verdict = ChainVerdict(link.event_id, BROKEN_CHAIN, f"device {device!r} seq 1 must have a zero prev")
        elif before is not None and link.prev != before.chain_hash:
            verdict = ChainVerdict(
                link.event_id, BROKEN_CHAIN,
                f"prev is not the hash of device {device!r} seq {seq - 1}, event {before.event_id} "
                f"(session {before.session_id!r})",
            )  # fmt: skip
        elif before is None and (parent := next((e for e in refused_before if e.chain_hash == link.prev), None)):
            verdict = ChainVerdict(
                link.event_id, BROKEN_CHAIN, f"extends event {parent.event_id}, which was refused ({parent.status})"
            )
        elif after is not None and after.prev != link.chain_hash:
            verdict = ChainVerdict(
                link.event_id, BROKEN_CHAIN,
                f"device {device!r} seq {seq + 1}, event {after.event_id} (session {after.session_id!r}), "
                "stored earlier, does not point at this event",
            )  # fmt: skip
        else:
            verdict = ChainVerdict(link.event_id, OK)
        verdicts.append(verdict)
        decided = ChainLink(link.event_id, device, seq, link.prev, link.chain_hash, link.session_id, verdict.status)
        slots.setdefault((device, seq), []).append(decided)
    return verdicts


# --- keys ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionKeys:
    keyring: Keyring
    new_pins: Mapping[str, bytes] = field(default_factory=dict)
    mismatches: tuple[tuple[str, str], ...] = ()


def session_keys(
    trusted: Mapping[str, bytes],
    pinned: Mapping[str, bytes],
    declared: Mapping[str, bytes],
    *,
    trust_document_keys: bool,
) -> SessionKeys:
    """The keyring a session's events are verified with.

    `trusted` (configured) keys always win. With `trust_document_keys`, a key
    a document declares is used for a device that has no trusted or pinned key
    yet, and pinned (trust on first use); a declaration that disagrees with the
    trusted or pinned key is ignored and reported. Without it, declared and
    pinned keys are ignored: only configured keys count.
    """
    keys: dict[str, bytes] = {}
    pins: dict[str, bytes] = {}
    mismatches: list[tuple[str, str]] = []
    if trust_document_keys:
        for device_id, key in sorted(declared.items()):
            known = trusted.get(device_id, pinned.get(device_id))
            if known is None:
                keys[device_id] = pins[device_id] = key
            elif known != key:
                source = "configured" if device_id in trusted else "first declared"
                mismatches.append((device_id, f"document declares a key for {device_id!r} other than the {source} one"))
        keys.update(pinned)
    keys.update(trusted)
    return SessionKeys(Keyring(keys), pins, tuple(mismatches))


# --- reading documents once -----------------------------------------------------------


class SessionReader:
    """`read_session` remembered per document version, for the length of one request.

    A request reads a changed session when the sync session validates it, when the
    service locks its devices (PostgreSQL) and when it reconciles it; the document
    does not change in between unless another instance's copy was merged into it,
    and then its heads differ and it is read again.
    """

    def __init__(self) -> None:
        self._read: dict[str, tuple[list[bytes], SessionData]] = {}

    def __call__(self, doc_id: str, doc: Document) -> SessionData:
        heads = doc.get_heads()
        got = self._read.get(doc_id)
        if got is not None and got[0] == heads:
            return got[1]
        data = read_session(doc)
        self._read[doc_id] = (heads, data)
        return data

    def check(self, doc_id: str, doc: Document) -> None:
        """Refuse a document that is not a session, or that names another session."""
        data = self(doc_id, doc)
        if data.session_id != doc_id:
            raise DocumentError(f"document {doc_id!r} says it is session {data.session_id!r}")


def _peek_device(blob: bytes) -> str | None:
    try:
        return EVENT_CACHE.parse(blob).record.device_id
    except EventError:
        return None


def session_devices(data: SessionData) -> set[str]:
    """Devices a session names: declared keys and the signers of its events."""
    return set(data.devices) | {d for b in data.events.values() if (d := _peek_device(b))}


def _valid_events(session_id: str, events: Mapping[str, bytes], keyring: Keyring) -> list[SignedEvent]:
    """Events that verify, are stored under their own id and belong to this session."""
    out = []
    for key, blob in sorted(events.items()):
        try:
            event = EVENT_CACHE.verify(blob, keyring)
        except EventError:
            continue  # reported by the fold as invalid_event
        if event.event_id == key and event.record.session_id == session_id:
            out.append(event)
    return out


# --- the batch -------------------------------------------------------------------------


Certify = Callable[[str, bytes], "bytes | None"]
Price = Callable[[SessionData, Sequence[tuple[str, int, "int | None"]], int], PriceDecision]
"""`price(session, applied (type, ts, meter_wh), energy_wh)`: the service's pricing decision."""
Issue = Callable[..., bytes]
"""`issue(session_id=, energy_wh=, cost_cents=, currency=, heads=, issued_ts=, tariff=)` -> a signed receipt."""
WriteReceipt = Callable[[str, Document, bytes], None]


@dataclass(frozen=True)
class IngestRules:
    """What the service decides with: its keys, its prices, its receipt key."""

    trusted: Mapping[str, bytes]
    certify: Certify | None
    trust_document_keys: bool
    price: Price
    issue: Issue
    write_receipt: WriteReceipt


@dataclass
class BatchOutcome:
    """What a batch did: receipts issued, and the heads hash of every document it saved."""

    issued: list[str] = field(default_factory=list)
    saved: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Session:
    doc_id: str
    doc: Document
    data: SessionData
    devices: set[str]
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)
    keyring: Keyring = field(default_factory=Keyring)
    everything: Any = None
    valid: list[SignedEvent] = field(default_factory=list)


_EVENT_INSERT = (
    "event_id", "device_id", "seq", "session_id", "type", "ts", "meter_wh", "chain_hash", "prev", "data", "status",
    "applied", "first_seen",
)  # fmt: skip


def reconcile_batch(
    tx: Tx,
    docs: Mapping[str, Document],
    now: int,
    rules: IngestRules,
    read: Callable[[str, Document], SessionData],
    known_heads: Mapping[str, bytes],
) -> BatchOutcome:
    """Store session documents and everything derived from them, all in `tx`.

    Args:
        docs: every session document the request changed (or asks to re-price).
        read: `read_session`, remembered (`SessionReader`).
        known_heads: heads hash of each document as this process last stored or
            loaded it; a document whose heads still match is not saved again.

    Returns:
        the sessions that got a receipt, and the heads hash of each saved document.
    """
    out = BatchOutcome()
    sessions = []
    for doc_id, doc in sorted(docs.items()):
        data = read(doc_id, doc)
        sessions.append(_Session(doc_id, doc, data, session_devices(data)))
    if not sessions:
        return out
    ids = [s.doc_id for s in sessions]
    pinned = tx.device_keys({d for s in sessions for d in s.devices})
    rows = tx.ledger_rows_of(ids)

    # 1. Keys, in document order: a key pinned by one session binds the next ones.
    pins: list[tuple[str, bytes, str]] = []
    for s in sessions:
        declared = {d: k for d, k in s.data.devices.items() if len(k) == 32}
        trusted: Mapping[str, bytes] = rules.trusted
        if rules.certify is not None:
            # Devices that present a certificate from the site we trust.
            certify = rules.certify
            certified = {d: k for d, blob in sorted(s.data.devices.items()) if (k := certify(d, blob)) is not None}
            trusted = {**certified, **rules.trusted}
        keys = session_keys(
            trusted,
            {d: pinned[d] for d in s.devices if d in pinned},
            declared,
            trust_document_keys=rules.trust_document_keys,
        )
        for device_id, key in sorted(keys.new_pins.items()):
            pinned[device_id] = key
            pins.append((device_id, key, s.doc_id))
        s.keyring = keys.keyring
        s.conflicts += [(f"device:{d}", KEY_MISMATCH, detail) for d, detail in keys.mismatches]
        # Events that do not verify or belong elsewhere: reported by the fold of everything.
        s.everything = fold(s.doc_id, s.data.events, s.keyring)
        s.conflicts += [(c.event_id, c.kind, c.detail) for c in s.everything.conflicts if c.kind in _FOLD_INPUT_KINDS]
        s.valid = _valid_events(s.doc_id, s.data.events, s.keyring)
    tx.pin_devices_of([(d, k, doc_id, now) for d, k, doc_id in pins])

    # 2. The chain check, over every new event of the batch at once.
    known = tx.event_status(e.event_id for s in sessions for e in s.valid)
    new = {s.doc_id: [e for e in s.valid if e.event_id not in known] for s in sessions}
    fresh = [e for events in new.values() for e in events]
    verdicts: dict[str, ChainVerdict] = {}
    if fresh:
        slots = {(e.record.device_id, e.record.seq + d) for e in fresh for d in (-1, 0, 1)}
        columns = ("event_id", "device_id", "seq", "prev", "chain_hash", "session_id", "status")
        stored = [ChainLink(*(r[c] for c in columns)) for r in tx.events_at(slots)]
        verdicts = {v.event_id: v for v in check_chains([ChainLink.of(e) for e in fresh], stored)}

    # 3. What each session bills: its accepted events as stored, plus its new ones.
    stored_events = tx.events_of([s.doc_id for s in sessions if s.doc_id in rows])
    event_rows: list[tuple[Any, ...]] = []
    applied_changes: list[tuple[int, str]] = []
    conflict_rows: list[tuple[str, str, str, str]] = []
    ledger: list[dict[str, Any]] = []
    for s in sessions:
        doc_id, data = s.doc_id, s.data
        row = rows.get(doc_id)
        receipt: bytes | None = row["receipt"] if row else None
        billed = {r["event_id"]: r["data"] for r in stored_events.get(doc_id, ()) if r["status"] == OK}
        statuses = {}
        for event in new[doc_id]:
            verdict = verdicts[event.event_id]
            status = verdict.status
            if status != OK:
                s.conflicts.append((event.event_id, status, verdict.detail))
            elif receipt is not None:
                status = LATE
                s.conflicts.append((event.event_id, LATE, "arrived after the session's receipt; not billed"))
            statuses[event.event_id] = status
            if status == OK:
                billed[event.event_id] = event.encoded
        removed = [e for e in billed if e not in data.events]
        s.conflicts += [(e, EVENT_REMOVED, "event is no longer in the document; still billed") for e in removed]
        # The fold is pure: when the billed events are exactly the document's, its
        # result is the fold of everything, already computed.
        view = s.everything if billed == data.events else fold(doc_id, billed, s.keyring)
        s.conflicts += [(c.event_id, c.kind, c.detail) for c in view.conflicts]
        applied = set(view.event_ids)
        for event in new[doc_id]:
            r = event.record
            event_rows.append((
                r.event_id, r.device_id, r.seq, r.session_id, r.type, r.ts, r.meter_wh, event.chain_hash, r.prev,
                event.encoded, statuses[event.event_id], int(event.event_id in applied), now,
            ))  # fmt: skip
        applied_changes += [
            (int(r["event_id"] in applied), r["event_id"])
            for r in stored_events.get(doc_id, ())
            if bool(r["applied"]) != (r["event_id"] in applied)
        ]

        energy_wh = view.energy_wh
        billed_wh = row["energy_wh"] if receipt is not None and row is not None else energy_wh
        price = rules.price(data, [(e.record.type, e.record.ts, e.record.meter_wh) for e in view.applied], billed_wh)
        cost, currency = price.cost_cents, price.currency
        tariff_id, tariff_version, pricing = price.tariff_id, price.tariff_version, json.dumps(price.detail)

        if data.receipt is not None and data.receipt != receipt:
            digest = hashlib.sha256(data.receipt).hexdigest()[:16]
            what = "replaced by the cloud's receipt" if receipt is not None else "the cloud issued none"
            detail = f"document carries a receipt the cloud did not issue; {what}"
            s.conflicts.append((f"receipt:{digest}", FOREIGN_RECEIPT, detail))
        if receipt is not None:
            # The receipt is final: the ledger keeps what it says. A session receipted
            # unpriced is priced when a tariff valid at its start reaches the cloud
            # (the receipt's energy, the billed events' times; the receipt stays).
            assert row is not None
            if row["cost_cents"] is None and cost is not None:
                pricing = json.dumps({**price.detail, "priced_after_receipt": now})
            else:
                cost, currency, pricing = row["cost_cents"], row["currency"], row["pricing"]
                tariff_id, tariff_version = row["tariff_id"], row["tariff_version"]
            energy_wh = row["energy_wh"]
            receipt_heads, receipt_ts = row["receipt_heads"], row["receipt_ts"]
            if data.receipt != receipt:
                rules.write_receipt(doc_id, s.doc, receipt)
        elif view.state == "completed":
            heads = sorted(s.doc.get_heads())
            receipt = rules.issue(
                session_id=doc_id, energy_wh=energy_wh, cost_cents=cost, currency=currency, heads=heads,
                issued_ts=now,
                tariff=(tariff_id, tariff_version) if tariff_id is not None and tariff_version is not None else None,
            )  # fmt: skip
            rules.write_receipt(doc_id, s.doc, receipt)
            receipt_heads, receipt_ts = ",".join(h.hex() for h in heads), now
            out.issued.append(doc_id)
        else:
            receipt_heads, receipt_ts = None, None

        conflict_rows += [(doc_id, *c) for c in s.conflicts]
        state = "reconciled" if receipt is not None and view.state == "completed" else view.state
        # A node that let a driver charge offline on its site's policy for unknown id
        # tokens says so in the authorize event; such sessions wait for a person.
        review = next(
            (
                str(e.record.data.get("auth") or "offline")
                for e in view.applied
                if e.record.type == "authorize" and e.record.data.get("review") is True
            ),
            None,
        )
        ledger.append({
            "session_id": doc_id, "site": data.site, "charger": data.charger, "connector": data.connector,
            "id_token": data.id_token, "start_ts": view.started_ts, "stop_ts": view.stopped_ts,
            "energy_wh": energy_wh, "cost_cents": cost, "currency": currency, "state": state,
            "conflicts": 0, "receipt_heads": receipt_heads, "receipt": receipt,
            "receipt_ts": receipt_ts, "review": review, "tariff_id": tariff_id, "tariff_version": tariff_version,
            "pricing": pricing, "first_seen": row["first_seen"] if row else now,
            "updated": now,
        })  # fmt: skip

    # 4. The writes, one statement each for the whole batch.
    tx.insert_event_rows(_EVENT_INSERT, event_rows)
    tx.set_applied(applied_changes)
    tx.add_conflicts(conflict_rows, now)
    counts = tx.conflict_counts(ids)
    for entry in ledger:
        entry["conflicts"] = counts.get(entry["session_id"], 0)
    tx.upsert_ledger_rows(ledger)
    saves = []
    for s in sessions:
        saved_heads = heads_hash(s.doc.get_heads())
        if known_heads.get(s.doc_id) != saved_heads:
            saves.append((s.doc_id, s.doc.save(), saved_heads, now))
            out.saved[s.doc_id] = saved_heads
    tx.save_documents(saves)
    return out
