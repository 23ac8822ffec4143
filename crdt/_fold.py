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
5. A reading is plausible: it rises from the previous applied reading by at most
   what the session's maximum power delivers in the time between their timestamps
   (`meter_plausibility`, plus `METER_SLACK_MS` for clocks and rounding). The maximum
   is the one the `authorize` event states (`data.max_power_w`, the connector's
   rating from the node's configuration, capped at `MAX_POWER_CEILING_W`), else
   `DEFAULT_MAX_POWER_W`. An implausible reading (a register of 2**53 Wh a minute
   after 0) is not applied and is reported as `implausible_meter`: it never bills.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import EventError
from ._events import EVENT_CACHE, EventCache, Keyring, SignedEvent, check_link

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
IMPLAUSIBLE_METER = "implausible_meter"

DEFAULT_MAX_POWER_W = 350_000
"""A connector's maximum power when its session does not say (the fastest public DC chargers)."""
MAX_POWER_CEILING_W = 4_000_000
"""The most a session's `authorize` event may claim (megawatt charging for trucks is 3.75 MW)."""
METER_SLACK_MS = 60_000
"""Time added to the gap between two readings before the bound applies (clock steps, meter lag)."""


def session_max_power_w(authorize_data: Mapping[str, Any] | None) -> int:
    """The maximum power a session may draw: its `authorize` event's `max_power_w` when that is
    a positive integer (capped at MAX_POWER_CEILING_W), else DEFAULT_MAX_POWER_W."""
    value = (authorize_data or {}).get("max_power_w")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return min(value, MAX_POWER_CEILING_W)
    return DEFAULT_MAX_POWER_W


def meter_plausibility(previous_wh: int, previous_ts: int, meter_wh: int, ts: int, max_power_w: int) -> str | None:
    """Why a cumulative reading cannot follow the previous one, or None when it can.

    Args:
        previous_wh, previous_ts: the last applied reading and its timestamp (ms).
        meter_wh, ts: the new reading and its timestamp (ms).
        max_power_w: the session's maximum power (`session_max_power_w`).
    """
    rise = meter_wh - previous_wh
    elapsed_ms = max(0, ts - previous_ts) + METER_SLACK_MS
    allowed = max_power_w * elapsed_ms // 3_600_000
    if rise > allowed:
        return (
            f"meter rose {rise} Wh in {max(0, ts - previous_ts) / 1000:g} s: more than {max_power_w} W "
            f"allows ({allowed} Wh)"
        )
    return None


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
    max_power_w: int = DEFAULT_MAX_POWER_W
    last_meter_ts: int | None = None

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
    cache: EventCache | None = EVENT_CACHE,
) -> SessionView:
    """Fold a session's events (the document's `events` map) into its state.

    Args:
        session_id: the document's session id; events for another session conflict.
        events: event_id -> encoded signed event, as stored in the document.
        keyring: trusted device keys, for signature checks.
        receipt_present: whether the cloud's receipt is in the document.
        cache: where signature checks are remembered (None: check every one).
    """
    return SessionFold(session_id, cache=cache).update(events, keyring, receipt_present=receipt_present)


_Slot = tuple[str, int]


class SessionFold:
    """The fold of one session, kept so that the next version of it costs only the new events.

    `update` gives exactly what `fold` gives for the same arguments (the invariants
    above hold either way). It takes the cheap path when the document only gained
    events, the keyring is unchanged, and every new event that verifies

    - fills a (device, seq) slot no other event holds (no fork to decide),
    - is not the missing predecessor of an event already folded (no link to recheck),
    - and, if it is applied, sorts after every event already through the state machine
      (so the transitions of the earlier ones do not change).

    That is the usual case: a node appends its next meter reading or stop. Anything
    else (a fork, a late event from the past, a removed or rewritten event, a new
    key) folds the whole session again; signature checks are remembered by the
    `EventCache` either way, so an old event is never verified twice.

    Attributes:
        full_folds, incremental_folds: how often each path was taken.
    """

    def __init__(self, session_id: str, *, cache: EventCache | None = EVENT_CACHE) -> None:
        self.session_id = session_id
        self.cache = cache if cache is not None else EventCache(max_entries=0)
        self.full_folds = 0
        self.incremental_folds = 0
        self._clear()

    def _clear(self) -> None:
        self._events: dict[str, bytes] = {}
        self._keys: dict[str, bytes] | None = None
        self._conflicts: list[Conflict] = []
        self._chained: dict[_Slot, SignedEvent] = {}
        self._last_key: tuple[int, str, int, str] | None = None
        self._state = "idle"
        self._first_meter: int | None = None
        self._last_meter: int | None = None
        self._last_meter_ts: int | None = None
        self._max_power_w = DEFAULT_MAX_POWER_W
        self._started: int | None = None
        self._stopped: int | None = None
        self._applied: list[SignedEvent] = []

    def update(self, events: Mapping[str, bytes], keyring: Keyring, *, receipt_present: bool = False) -> SessionView:
        """The session's state for this version of its `events` map (see the class docstring)."""
        keys = keyring.public_keys()
        if self._keys == keys and self._only_grew(events):
            new = {k: events[k] for k in events.keys() - self._events.keys()}
            if self._extend(new, keyring):
                self.incremental_folds += 1
                self._events.update(new)
                return self._view(receipt_present)
        self._clear()
        self._keys = keys
        self._events = dict(events)
        self._full(keyring)
        self.full_folds += 1
        return self._view(receipt_present)

    def _only_grew(self, events: Mapping[str, bytes]) -> bool:
        if len(events) < len(self._events):
            return False
        for key, blob in self._events.items():
            if events.get(key) != blob:
                return False
        return True

    def _verify(self, events: Mapping[str, bytes], keyring: Keyring) -> tuple[list[Conflict], list[SignedEvent]]:
        conflicts: list[Conflict] = []
        verified: list[SignedEvent] = []
        for key in sorted(events):
            blob = events[key]
            try:
                event = self.cache.verify(blob, keyring)
            except EventError as exc:
                conflicts.append(Conflict(INVALID_EVENT, key, f"{exc.reason}: {exc}"))
                continue
            if event.event_id != key:
                conflicts.append(Conflict(INVALID_EVENT, key, f"stored under another id ({event.event_id})"))
            elif event.record.session_id != self.session_id:
                conflicts.append(Conflict(WRONG_SESSION, key, f"event belongs to session {event.record.session_id!r}"))
            else:
                verified.append(event)
        return conflicts, verified

    def _full(self, keyring: Keyring) -> None:
        conflicts, verified = self._verify(self._events, keyring)
        self._conflicts = conflicts

        # Forks: same device and seq, different content. Smallest event_id wins (invariant 3).
        by_slot: dict[_Slot, list[SignedEvent]] = defaultdict(list)
        for event in verified:
            by_slot[(event.record.device_id, event.record.seq)].append(event)
        for slot, group in by_slot.items():
            group.sort(key=lambda e: e.event_id)
            self._chained[slot] = group[0]
            for loser in group[1:]:
                conflicts.append(
                    Conflict(FORK, loser.event_id, f"device {slot[0]!r} seq {slot[1]} also signed {group[0].event_id}")
                )
        self._run(self._linked(list(self._chained.items())))

    def _linked(self, slots: list[tuple[_Slot, SignedEvent]]) -> list[SignedEvent]:
        """Chain links between consecutive events of one device present in this document."""
        candidates: list[SignedEvent] = []
        for (device_id, seq), event in slots:
            previous = self._chained.get((device_id, seq - 1))
            if previous is not None:
                try:
                    check_link(previous, event)
                except EventError as exc:
                    self._conflicts.append(Conflict(BROKEN_CHAIN, event.event_id, str(exc)))
                    continue
            candidates.append(event)
        return candidates

    def _extend(self, new: Mapping[str, bytes], keyring: Keyring) -> bool:
        """Fold in events added since the last update; False (nothing changed) if it takes a full fold."""
        conflicts, verified = self._verify(new, keyring)
        slots: dict[_Slot, SignedEvent] = {}
        for event in verified:
            slot = (event.record.device_id, event.record.seq)
            if slot in self._chained or slot in slots:
                return False  # a fork: the winner is decided over the whole group
            if (slot[0], slot[1] + 1) in self._chained:
                return False  # an event already folded gains its predecessor: its link is checked now
            slots[slot] = event
        # Only events that pass their link check go through the state machine; they
        # must all come after what went through it before.
        saved = (len(self._conflicts), dict(self._chained))
        self._chained.update(slots)
        candidates = sorted(self._linked(sorted(slots.items())), key=_order_key)
        if candidates and self._last_key is not None and _order_key(candidates[0]) < self._last_key:
            del self._conflicts[saved[0] :]
            self._chained = saved[1]
            return False
        self._conflicts.extend(conflicts)
        self._run(candidates)
        return True

    def _run(self, candidates: list[SignedEvent]) -> None:
        """Put events (no forks, links checked) through the transition table, in order."""
        for event in sorted(candidates, key=_order_key):
            r = event.record
            self._last_key = _order_key(event)
            target = TRANSITIONS.get((self._state, r.type))
            if target is None:
                self._conflicts.append(Conflict(ILLEGAL_TRANSITION, r.event_id, f"{r.type!r} in state {self._state!r}"))
                continue
            if r.meter_wh is not None and self._last_meter is not None and r.meter_wh < self._last_meter:
                self._conflicts.append(
                    Conflict(METER_BACKWARDS, r.event_id, f"meter {r.meter_wh} Wh after {self._last_meter} Wh")
                )
                continue
            if r.meter_wh is not None and self._last_meter is not None and self._last_meter_ts is not None:
                why = meter_plausibility(self._last_meter, self._last_meter_ts, r.meter_wh, r.ts, self._max_power_w)
                if why is not None:
                    self._conflicts.append(Conflict(IMPLAUSIBLE_METER, r.event_id, why))
                    continue
            if r.type == "authorize":
                self._max_power_w = session_max_power_w(r.data)
            if r.meter_wh is not None:
                self._first_meter = r.meter_wh if self._first_meter is None else self._first_meter
                self._last_meter = r.meter_wh
                self._last_meter_ts = r.ts
            if r.type == "start":
                self._started = r.ts
            if target == "completed":
                self._stopped = r.ts
            self._state = target
            self._applied.append(event)

    def _view(self, receipt_present: bool) -> SessionView:
        state = self._state
        if receipt_present and state == "completed":
            state = "reconciled"
        first, last = self._first_meter, self._last_meter
        return SessionView(
            state=state,
            energy_wh=(last - first) if first is not None and last is not None else 0,
            first_meter_wh=first,
            last_meter_wh=last,
            started_ts=self._started,
            stopped_ts=self._stopped,
            applied=tuple(self._applied),
            conflicts=tuple(sorted(self._conflicts)),
            receipt_present=receipt_present,
            max_power_w=self._max_power_w,
            last_meter_ts=self._last_meter_ts,
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
