"""The session state machine: a deterministic fold of a session's events.

Rules (the transition table below is the whole machine)::

    idle --reserve--> reserving --authorize--> authorized --start--> charging
    idle --authorize--> authorized            charging --pause--> paused --resume--> charging
    charging|paused --meter--> (same state)   reserving|authorized|charging|paused --stop--> completed
    completed + a cloud receipt in the document  ==  reconciled

Invariants of `fold`:

1. The result depends only on the *set* of event bytes (and the receipt), never on
   the order they arrived in or on the replica: events are sorted by
   `(ts, device_id, seq, event_id)` before folding.
2. Nothing is dropped silently. An event that does not verify, does not belong to
   the session, forks a device's chain (same device and `seq`, other content),
   breaks a chain link, makes an illegal transition or moves the meter backwards
   is not applied and is reported in `conflicts`.
3. Of two forked events, the one with the smaller `event_id` is applied, so every
   replica makes the same choice; the other is reported.
4. Energy is the last applied cumulative meter reading minus the first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import EventError
from ._events import Keyring, SignedEvent, check_link, verify_event

STATES = ("idle", "reserving", "authorized", "charging", "paused", "completed", "reconciled")
EVENT_TYPES = ("reserve", "authorize", "start", "meter", "pause", "resume", "stop")

TRANSITIONS: Mapping[tuple[str, str], str] = {
    ("idle", "reserve"): "reserving",
    ("idle", "authorize"): "authorized",
    ("reserving", "authorize"): "authorized",
    ("reserving", "stop"): "completed",
    ("authorized", "start"): "charging",
    ("authorized", "stop"): "completed",
    ("charging", "meter"): "charging",
    ("charging", "pause"): "paused",
    ("charging", "stop"): "completed",
    ("paused", "meter"): "paused",
    ("paused", "resume"): "charging",
    ("paused", "stop"): "completed",
}

# Conflict kinds, as reported (and as the cloud files them for review).
INVALID_EVENT = "invalid_event"
WRONG_SESSION = "wrong_session"
FORK = "fork"
BROKEN_CHAIN = "broken_chain"
ILLEGAL_TRANSITION = "illegal_transition"
METER_BACKWARDS = "meter_backwards"


@dataclass(frozen=True, order=True)
class Conflict:
    """One event the fold refused to apply, and why."""

    kind: str
    event_id: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "event_id": self.event_id, "detail": self.detail}


@dataclass(frozen=True)
class SessionView:
    """The folded state of a session."""

    state: str
    energy_wh: int
    first_meter_wh: int | None
    last_meter_wh: int | None
    started_ts: int | None
    stopped_ts: int | None
    applied: tuple[SignedEvent, ...]
    conflicts: tuple[Conflict, ...] = field(default=())
    receipt_present: bool = False

    @property
    def event_ids(self) -> tuple[str, ...]:
        return tuple(e.event_id for e in self.applied)


def _order_key(event: SignedEvent) -> tuple[int, str, int, str]:
    r = event.record
    return (r.ts, r.device_id, r.seq, r.event_id)


def fold(
    session_id: str,
    events: Mapping[str, bytes],
    keyring: Keyring,
    *,
    receipt_present: bool = False,
) -> SessionView:
    """Fold a session's events (the document's `events` map) into its state.

    Args:
        session_id: the document's session id; events for another session conflict.
        events: event_id -> encoded signed event, as stored in the document.
        keyring: trusted device keys, for signature checks.
        receipt_present: whether the cloud's receipt is in the document.
    """
    conflicts: list[Conflict] = []
    verified: list[SignedEvent] = []
    for key in sorted(events):
        blob = events[key]
        try:
            event = verify_event(blob, keyring)
        except EventError as exc:
            conflicts.append(Conflict(INVALID_EVENT, key, f"{exc.reason}: {exc}"))
            continue
        if event.event_id != key:
            conflicts.append(Conflict(INVALID_EVENT, key, f"stored under another id ({event.event_id})"))
        elif event.record.session_id != session_id:
            conflicts.append(
                Conflict(WRONG_SESSION, key, f"event belongs to session {event.record.session_id!r}")
            )
        else:
            verified.append(event)

    # Forks: same device and seq, different content. Smallest event_id wins (invariant 3).
    by_slot: dict[tuple[str, int], list[SignedEvent]] = defaultdict(list)
    for event in verified:
        by_slot[(event.record.device_id, event.record.seq)].append(event)
    chained: dict[tuple[str, int], SignedEvent] = {}
    for slot, group in by_slot.items():
        group.sort(key=lambda e: e.event_id)
        chained[slot] = group[0]
        for loser in group[1:]:
            conflicts.append(
                Conflict(FORK, loser.event_id, f"device {slot[0]!r} seq {slot[1]} also signed {group[0].event_id}")
            )

    # Chain links between consecutive events of one device present in this document.
    candidates: list[SignedEvent] = []
    for (device_id, seq), event in chained.items():
        previous = chained.get((device_id, seq - 1))
        if previous is not None:
            try:
                check_link(previous, event)
            except EventError as exc:
                conflicts.append(Conflict(BROKEN_CHAIN, event.event_id, str(exc)))
                continue
        candidates.append(event)

    state = "idle"
    first_meter: int | None = None
    last_meter: int | None = None
    started: int | None = None
    stopped: int | None = None
    applied: list[SignedEvent] = []
    for event in sorted(candidates, key=_order_key):
        r = event.record
        target = TRANSITIONS.get((state, r.type))
        if target is None:
            conflicts.append(Conflict(ILLEGAL_TRANSITION, r.event_id, f"{r.type!r} in state {state!r}"))
            continue
        if r.meter_wh is not None and last_meter is not None and r.meter_wh < last_meter:
            conflicts.append(
                Conflict(METER_BACKWARDS, r.event_id, f"meter {r.meter_wh} Wh after {last_meter} Wh")
            )
            continue
        if r.meter_wh is not None:
            first_meter = r.meter_wh if first_meter is None else first_meter
            last_meter = r.meter_wh
        if r.type == "start":
            started = r.ts
        if target == "completed":
            stopped = r.ts
        state = target
        applied.append(event)

    if receipt_present and state == "completed":
        state = "reconciled"
    energy = (last_meter - first_meter) if first_meter is not None and last_meter is not None else 0
    return SessionView(
        state=state,
        energy_wh=energy,
        first_meter_wh=first_meter,
        last_meter_wh=last_meter,
        started_ts=started,
        stopped_ts=stopped,
        applied=tuple(applied),
        conflicts=tuple(sorted(conflicts)),
        receipt_present=receipt_present,
    )


def summarize_event(event: SignedEvent) -> dict[str, Any]:
    """A JSON-friendly view of an applied event, for APIs and reports."""
    r = event.record
    return {
        "event_id": r.event_id,
        "type": r.type,
        "device_id": r.device_id,
        "seq": r.seq,
        "ts": r.ts,
        "meter_wh": r.meter_wh,
    }
