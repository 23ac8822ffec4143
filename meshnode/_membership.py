"""Membership, failure detection, gossip-target choice and leader election, sans-IO.

Nothing in this module opens a socket, calls trio or reads a clock: time comes in
as ``now`` (seconds on the node's monotonic clock, ``trio.current_time()`` at the
edge) and every decision is returned to the caller. A thin trio task calls
``Membership.tick(now)`` every heartbeat period, feeds gossip it receives to
``Membership.merge(records, now)``, asks ``choose_gossip_targets`` whom to send
``Membership.records_for_gossip()`` to, and asks ``Membership.leader(now, current)``
who forwards to the cloud. The scheme is the gossip-style failure detector of van
Renesse, Minsky and Hayden ("A Gossip-Style Failure Detection Service",
Middleware 1998) with SWIM's incarnation numbers for refutation (Das, Gupta and
Motivala, DSN 2002, section 4.2).

Rules
-----

R1. Every node owns one record ``(node_id, incarnation, heartbeat, uplink_score,
    address, version, leader)`` and is the only one that changes it. Records of
    one node are ordered by ``(incarnation, heartbeat)``; the higher one wins. Two
    different records with the same ``(incarnation, heartbeat)`` cannot come from
    an honest node (R6 bumps the heartbeat on every change), but if they ever meet
    the one with the larger remaining fields (``uplink_score``, ``address``,
    ``version``, ``leader``) wins, so every node still keeps the same one. With
    that tie-break the merge is a join: commutative, associative, idempotent.
R2. A peer's ``last_changed`` is the local time at which we first saw it or its
    ``(incarnation, heartbeat)`` last increased. A record that does not increase
    it is no evidence of life, whoever relays it. A direct successful exchange
    with the peer (``observe_direct``) is evidence too; ``last_seen`` is the later
    of the two.
R3. With ``age = now - last_seen``: ALIVE while ``age < suspect_after``, SUSPECT
    while ``age < dead_after``, DEAD while ``age < dead_after + forget_after``;
    after that the record is *forgotten*: it leaves the view, and its entry stays
    behind as a tombstone for another ``forget_after`` before it is dropped. A
    DEAD entry comes back with a higher ``(incarnation, heartbeat)`` or a direct
    exchange, a forgotten one only with a higher ``(incarnation, heartbeat)``;
    stale gossip revives neither. Ourselves are always ALIVE.
R4. Only ourselves and ALIVE or SUSPECT peers are gossiped. A node never spreads a
    heartbeat it believes dead, so a peer that merely heard of a dead node later
    (or a node that just joined) is not told to consider it alive again.
R5. Refutation: a record *about us* that differs from ours and is at least as
    high as ours means someone knows a newer "us" than we do (we restarted without
    keeping our incarnation, or somebody relays a forgery). We answer by moving to
    ``incarnation = theirs + 1, heartbeat = 0``, which beats every copy of it.
R6. Every change to our own record (tick, score, address, leader, refutation,
    restart) raises its ``(incarnation, heartbeat)``; otherwise a peer that has
    the old content at the same key would never take the new one.
R7. Election (``elect_leader``): among live nodes (ourselves included) whose
    uplink score is at least ``threshold``, pick the highest
    ``(score // bucket_size, node_id)``. Stickiness: an incumbent that still
    passes the threshold keeps the role unless some candidate's score is at least
    ``bucket_size`` points above the incumbent's; then the best such candidate, by
    the same key, takes over. Scores that jitter by less than half a bucket can
    therefore never move the role, while a clearly better uplink (a whole bucket)
    or an incumbent that fails or drops below the threshold always does.
R8. ``Membership.leader`` takes the incumbent from the shared view, not from local
    memory: a node publishes whom it follows in its record's ``leader`` field, and
    the live, eligible nodes whose record names themselves are the claimants. The
    best claimant by ``(score // bucket_size, node_id)`` is the incumbent; only
    when nobody claims does the caller's ``current`` serve. Nodes with the same
    view therefore elect the same leader even if their histories differ, and two
    leaders left over from a healed partition settle on one.

Invariants (numbered; tests check each)
---------------------------------------

1. Our own ``(incarnation, heartbeat)`` never decreases, and rises with every
   change to our record (R6).
2. A stored peer record's ``(incarnation, heartbeat)`` never decreases while the
   entry exists; merging never makes it older.
3. For one ``now``, the peer table after merging a multiset of records does not
   depend on their order, grouping or repetition (R1).
4. With time only moving forward and no new evidence, a peer moves only ALIVE ->
   SUSPECT -> DEAD -> forgotten; only a higher ``(incarnation, heartbeat)`` (or,
   before it is forgotten, a direct exchange) makes it ALIVE again.
5. ``records_for_gossip`` holds ourselves and ALIVE or SUSPECT peers only (R4).
6. ``MemberRecord`` cannot hold an out-of-range field; ``from_wire`` either
   returns a valid record or raises ``MembershipError`` and changes nothing.
7. ``elect_leader`` and ``choose_gossip_targets`` are pure: the same inputs, as
   sets, give the same output (and the same random draws) whatever their order.

Defaults, and why
-----------------

- Heartbeat every 1 s (the caller's tick) matches the gossip period of DESIGN.md,
  so each gossip round carries a fresh heartbeat.
- ``suspect_after = 5.0`` (DESIGN.md): five heartbeat periods. Heartbeats travel
  several gossip hops, so a distant node sees a peer's heartbeat advance in
  irregular steps; five seconds without any advance tolerates a few lost
  datagrams or unlucky target draws in a row. SUSPECT still counts as live: it
  is a warning on the site page, not a verdict.
- ``dead_after = 15.0`` (DESIGN.md): three suspicion windows, so a short radio or
  Wi-Fi drop does not move the leader (a move hands forwarding to another node,
  which starts its cloud sync afresh). Forwarding is not real time; 15 s to fail
  over is cheap next to a flapping leader.
- ``forget_after = 300.0``: a dead charger stays on the operator's page for five
  minutes before it disappears, and its tombstone outlives any relayed copy of its
  last heartbeat (which R4 already limits to seconds) by orders of magnitude.
- ``threshold = 50``: half of the 0-100 uplink score; below that the uplink probe
  says the path to the cloud is worse than working.
- ``bucket_size = 20``: five coarse classes of uplink, and the margin a challenger
  needs. It absorbs a score jitter of up to 9 points per node (two nodes that
  wobble in opposite directions stay under 20 apart) and still hands over for a
  clearly better uplink. This assumes the uplink score's noise stays within that
  band; measure it and retune here (docs/membership.md).
"""

from __future__ import annotations

import enum
import functools
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_BUCKET_SIZE",
    "DEFAULT_DEAD_AFTER",
    "DEFAULT_FORGET_AFTER",
    "DEFAULT_SUSPECT_AFTER",
    "DEFAULT_THRESHOLD",
    "MAX_ADDRESS_LEN",
    "MAX_COUNTER",
    "MAX_NODE_ID_LEN",
    "MAX_VERSION_LEN",
    "MemberRecord",
    "MemberView",
    "Membership",
    "MembershipError",
    "PeerState",
    "choose_gossip_targets",
    "elect_leader",
]

DEFAULT_SUSPECT_AFTER = 5.0
DEFAULT_DEAD_AFTER = 15.0
DEFAULT_FORGET_AFTER = 300.0
DEFAULT_THRESHOLD = 50
DEFAULT_BUCKET_SIZE = 20

MAX_COUNTER = 2**63 - 1
"""Largest incarnation or heartbeat: fits a CBOR uint64, a SQLite INTEGER and an int64."""

MAX_NODE_ID_LEN = 128
MAX_ADDRESS_LEN = 300
"""A 253-character DNS name, a colon and a port, with room for a bracketed IPv6 literal."""
MAX_VERSION_LEN = 64
MAX_WIRE_KEYS = 16
"""A record map may carry fields a newer version adds (they are ignored), but not many."""

_WIRE_KEYS = {
    "node_id": "id",
    "incarnation": "inc",
    "heartbeat": "hb",
    "uplink_score": "up",
    "address": "addr",
    "version": "ver",
    "leader": "ldr",
}


class MembershipError(ValueError):
    """A member record has a bad shape: a missing key, a wrong type, a value out of range.

    Raised by ``MemberRecord.from_wire`` for input from the network (answer it
    with an error and keep serving; nothing was changed) and by the
    ``MemberRecord`` constructor when our own code builds an invalid record.
    """


class PeerState(enum.Enum):
    """What the failure detector believes about a peer (R3)."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


# --- records ------------------------------------------------------------------


_WHITESPACE = re.compile(r"\s")


@functools.lru_cache(maxsize=4096)
def _text_problem(value: str, max_len: int) -> str | None:
    """Why `value` is not acceptable text, or None. Cached: ids and addresses repeat
    in every gossip message, and checking them dominated large simulated meshes."""
    if not value:
        return "must not be empty"
    if len(value) > max_len:
        return f"is {len(value)} characters long, at most {max_len} allowed"
    if not value.isprintable() or _WHITESPACE.search(value):
        return f"must be printable and contain no whitespace: {value[:40]!r}"
    return None


def _check_text(field: str, value: object, max_len: int) -> str:
    if type(value) is not str:
        raise MembershipError(f"{field} must be a string, got {type(value).__name__}")
    problem = _text_problem(value, max_len) if len(value) <= 4 * max_len else f"is {len(value)} characters long"
    if problem is not None:
        raise MembershipError(f"{field} {problem}")
    return value


def _check_counter(field: str, value: object, maximum: int) -> int:
    # bool is a subclass of int; True is not a heartbeat.
    if type(value) is not int:
        raise MembershipError(f"{field} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        # A peer can send a number too long for str() (Python caps int-to-text
        # conversion): show its size instead of its digits.
        shown = str(value) if value.bit_length() <= 64 else f"a {value.bit_length()}-bit number"
        raise MembershipError(f"{field} must be between 0 and {maximum}, got {shown}")
    return value


def _check_address(value: object) -> str:
    address = _check_text("address", value, MAX_ADDRESS_LEN)
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise MembershipError(f"address must be 'host:port', got {address[:40]!r}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535 and port[0] != "0"):
        raise MembershipError(f"address port must be 1-65535 in decimal, got {port[:10]!r}")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3 or "[" in host[1:] or "]" in host[:-1]:
            raise MembershipError(f"address has a malformed bracketed host: {host[:40]!r}")
    elif ":" in host or "[" in host or "]" in host:
        raise MembershipError(f"address: an IPv6 host must be in brackets ('[::1]:5683'), got {host[:40]!r}")
    return address


@dataclass(frozen=True)
class MemberRecord:
    """One node's self-description, as gossiped (R1).

    Frozen and validated on construction, so a record that exists is well formed
    whether it was built locally or parsed from a peer (invariant 6).

    Attributes:
        node_id: the node's stable id.
        incarnation: raised each time the node comes back (persisted by the node)
            and when it refutes a newer "us" (R5).
        heartbeat: raised on every tick and every change of the record (R6).
        uplink_score: 0-100, how well this node reaches the cloud right now.
        address: ``host:port`` where its transport listens.
        version: the software version it runs.
        leader: whom this node currently follows (itself if it leads), or None.
    """

    node_id: str
    incarnation: int
    heartbeat: int
    uplink_score: int
    address: str
    version: str
    leader: str | None = None

    def __post_init__(self) -> None:
        _check_text("node_id", self.node_id, MAX_NODE_ID_LEN)
        _check_counter("incarnation", self.incarnation, MAX_COUNTER)
        _check_counter("heartbeat", self.heartbeat, MAX_COUNTER)
        _check_counter("uplink_score", self.uplink_score, 100)
        _check_address(self.address)
        _check_text("version", self.version, MAX_VERSION_LEN)
        if self.leader is not None:
            _check_text("leader", self.leader, MAX_NODE_ID_LEN)

    @property
    def key(self) -> tuple[int, int]:
        """``(incarnation, heartbeat)``: the order in which records of one node supersede."""
        return (self.incarnation, self.heartbeat)

    def _order(self) -> tuple[int, int, int, str, str, bool, str]:
        # R1: the key decides; the rest only breaks ties that honest nodes never create.
        return (
            self.incarnation,
            self.heartbeat,
            self.uplink_score,
            self.address,
            self.version,
            self.leader is not None,
            self.leader or "",
        )

    def supersedes(self, other: MemberRecord) -> bool:
        """Whether this record replaces ``other`` (same node) in a merge (R1)."""
        return self._order() > other._order()

    def to_wire(self) -> dict[str, Any]:
        """A plain dict (CBOR- and JSON-able) with short keys; ``leader`` is null when unset."""
        return {short: getattr(self, name) for name, short in _WIRE_KEYS.items()}

    @classmethod
    def from_wire(cls, obj: object) -> MemberRecord:
        """Parse a record received from the network, strictly.

        Every field is checked for type (``bool`` is not an integer here), range
        and length. Keys this version does not know are ignored, so a newer node
        may add fields without cutting itself off from older ones, but a map with
        more than ``MAX_WIRE_KEYS`` entries is refused. ``ldr`` may be absent.

        Raises:
            MembershipError: the object is not a record map, a key is missing, or
                a value has the wrong type or is out of range; the message says which.
        """
        if not isinstance(obj, dict):
            raise MembershipError(f"a member record must be a map, got {type(obj).__name__}")
        if len(obj) > MAX_WIRE_KEYS:
            raise MembershipError(f"a member record has {len(obj)} keys, at most {MAX_WIRE_KEYS} allowed")
        values: dict[str, Any] = {}
        for name, short in _WIRE_KEYS.items():
            if short in obj:
                values[name] = obj[short]
            elif name != "leader":
                raise MembershipError(f"member record lacks {short!r} ({name})")
        return cls(**values)


class MemberView(NamedTuple):
    """One row of ``Membership.view``: the record, the verdict, and seconds since last seen."""

    record: MemberRecord
    state: PeerState
    age: float


# --- the peer table -----------------------------------------------------------


@dataclass
class _Entry:
    record: MemberRecord
    last_changed: float
    last_direct: float = -math.inf

    @property
    def last_seen(self) -> float:
        return max(self.last_changed, self.last_direct)


class Membership:
    """The local view of the mesh: our own record and what we know of every peer.

    Every input (``tick``, ``merge``, ``observe_direct``, the setters) first
    updates state, then ``_evaluate(now)`` drops the entries whose tombstone has
    run out; every verdict (``state``, ``view``, ``live_peers``, ``leader``) is a
    function of the stored entries and the ``now`` passed in. The clock must not
    run backwards between calls.

    Args:
        self_record: our record as we start. A node that comes back must start at
            a higher incarnation than it ever used (persist ``self_record.incarnation``
            whenever it changes, refutation included), or peers ignore it until its
            heartbeat passes the old one.
        suspect_after: seconds without a heartbeat advance before SUSPECT.
        dead_after: seconds without one before DEAD.
        forget_after: seconds a DEAD peer stays in the view; its tombstone is kept
            as long again.

    Raises:
        ValueError: the timeouts are not ``0 < suspect_after < dead_after`` and
            ``forget_after > 0``.
    """

    def __init__(
        self,
        self_record: MemberRecord,
        *,
        suspect_after: float = DEFAULT_SUSPECT_AFTER,
        dead_after: float = DEFAULT_DEAD_AFTER,
        forget_after: float = DEFAULT_FORGET_AFTER,
    ) -> None:
        if not isinstance(self_record, MemberRecord):
            raise TypeError(f"self_record must be a MemberRecord, got {type(self_record).__name__}")
        if not (0 < suspect_after < dead_after and math.isfinite(dead_after)):
            raise ValueError("need 0 < suspect_after < dead_after (finite)")
        if not (0 < forget_after and math.isfinite(forget_after)):
            raise ValueError("need 0 < forget_after (finite)")
        self._self = self_record
        self.suspect_after = float(suspect_after)
        self.dead_after = float(dead_after)
        self.forget_after = float(forget_after)
        self._peers: dict[str, _Entry] = {}
        self._next_expiry = math.inf  # no tombstone runs out before this time
        self._now: float | None = None

    # -- our own record --------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._self.node_id

    @property
    def self_record(self) -> MemberRecord:
        """Our current record (persist its incarnation when it changes)."""
        return self._self

    def _bump(self, **changes: Any) -> MemberRecord:
        # R6: every change raises the key; a heartbeat at its ceiling rolls into a new incarnation.
        record = self._self
        if record.heartbeat < MAX_COUNTER:
            self._self = replace(record, heartbeat=record.heartbeat + 1, **changes)
        else:
            self._self = replace(record, incarnation=record.incarnation + 1, heartbeat=0, **changes)
        return self._self

    def tick(self, now: float) -> MemberRecord:
        """Raise our heartbeat (call once per heartbeat period) and return our new record."""
        self._advance(now)
        record = self._bump()
        self._evaluate(now)
        return record

    def set_uplink_score(self, score: int) -> MemberRecord:
        """Publish a new uplink score; the heartbeat rises with it so the change spreads (R6)."""
        _check_counter("uplink_score", score, 100)
        if score == self._self.uplink_score:
            return self._self
        return self._bump(uplink_score=score)

    def set_address(self, address: str) -> MemberRecord:
        """Publish a new transport address (after binding, or when the interface changes)."""
        _check_address(address)
        if address == self._self.address:
            return self._self
        return self._bump(address=address)

    def set_leader(self, leader: str | None) -> MemberRecord:
        """Publish whom we follow (ourselves if we lead); peers use it for stickiness (R8)."""
        if leader is not None:
            _check_text("leader", leader, MAX_NODE_ID_LEN)
        if leader == self._self.leader:
            return self._self
        return self._bump(leader=leader)

    def restart(self, incarnation: int | None = None) -> MemberRecord:
        """Start a new life of this node: a higher incarnation, heartbeat 0.

        Args:
            incarnation: the incarnation to start at (the persisted one plus one);
                None means one above the current incarnation.

        Raises:
            ValueError: ``incarnation`` is not above the current one (peers would
                ignore us) or is out of range.
        """
        if incarnation is None:
            incarnation = self._self.incarnation + 1
        _check_counter("incarnation", incarnation, MAX_COUNTER)
        if incarnation <= self._self.incarnation:
            raise ValueError(
                f"restart needs an incarnation above the current {self._self.incarnation}, got {incarnation}"
            )
        self._self = replace(self._self, incarnation=incarnation, heartbeat=0)
        return self._self

    # -- inputs from peers -----------------------------------------------------

    def merge(self, records: Iterable[MemberRecord], now: float) -> list[str]:
        """Fold gossiped records into the view (R1, R2, R5).

        Args:
            records: parsed records (``MemberRecord.from_wire``), ours included or not.
            now: local time of arrival.

        Returns:
            The sorted ids whose visible record changed; our own id if we refuted.
        """
        self._advance(now)
        changed: set[str] = set()
        for record in records:
            if not isinstance(record, MemberRecord):
                raise TypeError(f"merge takes MemberRecord, got {type(record).__name__}")
            if record.node_id == self._self.node_id:
                if self._refute(record):
                    changed.add(record.node_id)
                continue
            entry = self._peers.get(record.node_id)
            if entry is None:
                self._peers[record.node_id] = entry = _Entry(record, now)
                self._next_expiry = min(self._next_expiry, self._forget_at(entry) + self.forget_after)
                changed.add(record.node_id)
                continue
            if not record.supersedes(entry.record):
                continue
            visible = not self._forgotten(entry, now)
            if record.key > entry.record.key:
                entry.last_changed = max(entry.last_changed, now)
                visible = True
            entry.record = record
            if visible:
                changed.add(record.node_id)
        self._evaluate(now)
        return sorted(changed)

    def _refute(self, record: MemberRecord) -> bool:
        # R5: someone holds a record of us that is at least as new as ours but not ours.
        own = self._self
        if record == own or record.key < own.key:
            return False
        incarnation = min(record.incarnation + 1, MAX_COUNTER)
        heartbeat = 0 if incarnation > record.incarnation else min(record.heartbeat + 1, MAX_COUNTER)
        self._self = replace(own, incarnation=incarnation, heartbeat=heartbeat)
        return True

    def observe_direct(self, peer: str, now: float) -> bool:
        """Count a successful direct exchange with ``peer`` as evidence that it is alive (R2).

        Args:
            peer: a node id, or else the ``host:port`` address of a known peer.
            now: local time of the exchange.

        Returns:
            Whether a known, not yet forgotten peer was refreshed.
        """
        self._advance(now)
        if peer in self._peers:
            entries = [self._peers[peer]]
        else:
            entries = [e for e in self._peers.values() if e.record.address == peer]
        refreshed = False
        for entry in entries:
            if not self._forgotten(entry, now):
                entry.last_direct = max(entry.last_direct, now)
                refreshed = True
        self._evaluate(now)
        return refreshed

    # -- verdicts ----------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if self._now is None or now > self._now:
            self._now = now

    def _forget_at(self, entry: _Entry) -> float:
        return entry.last_seen + self.dead_after + self.forget_after

    def _forgotten(self, entry: _Entry, now: float) -> bool:
        return now >= self._forget_at(entry)

    def _evaluate(self, now: float) -> None:
        # The one step after each input: tombstones whose time has run out are dropped.
        # Only when the earliest tombstone can have run out: sweeping every peer on
        # every input made large meshes spend their time here. (Entries only ever
        # get later expiry times, so the bound stays a lower bound.)
        if now < self._next_expiry:
            return
        expired = [nid for nid, e in self._peers.items() if now >= self._forget_at(e) + self.forget_after]
        for nid in expired:
            del self._peers[nid]
        self._next_expiry = min((self._forget_at(e) + self.forget_after for e in self._peers.values()), default=math.inf)

    def _state_of(self, entry: _Entry, now: float) -> PeerState | None:
        age = now - entry.last_seen
        if age < self.suspect_after:
            return PeerState.ALIVE
        if age < self.dead_after:
            return PeerState.SUSPECT
        if age < self.dead_after + self.forget_after:
            return PeerState.DEAD
        return None

    def state(self, node_id: str, now: float) -> PeerState:
        """The failure detector's verdict on ``node_id`` at ``now`` (R3).

        Ourselves are ALIVE; an unknown or forgotten node is DEAD (there is no
        evidence that it is alive).
        """
        if node_id == self._self.node_id:
            return PeerState.ALIVE
        entry = self._peers.get(node_id)
        if entry is None:
            return PeerState.DEAD
        return self._state_of(entry, now) or PeerState.DEAD

    def view(self, now: float) -> list[MemberView]:
        """Every member we show (ourselves, ALIVE, SUSPECT, DEAD), sorted by node id.

        ``age`` is seconds since the member was last seen (0 for ourselves).
        """
        self._advance(now)
        self._evaluate(now)
        rows = [MemberView(self._self, PeerState.ALIVE, 0.0)]
        for entry in self._peers.values():
            state = self._state_of(entry, now)
            if state is not None:
                rows.append(MemberView(entry.record, state, max(0.0, now - entry.last_seen)))
        rows.sort(key=lambda row: row.record.node_id)
        return rows

    def live_peers(self, now: float) -> list[MemberRecord]:
        """ALIVE and SUSPECT peers, ourselves excluded, sorted by node id."""
        return [
            row.record
            for row in self.view(now)
            if row.record.node_id != self._self.node_id and row.state is not PeerState.DEAD
        ]

    def records_for_gossip(self, now: float | None = None) -> list[MemberRecord]:
        """What to send in a gossip round: ourselves and ALIVE or SUSPECT peers (R4).

        Args:
            now: the time of the round; by default the latest time this view was
                given (the node's 1 s tick keeps it current).
        """
        if now is None:
            now = self._now
        if now is None:
            return [self._self]
        return [row.record for row in self.view(now) if row.state is not PeerState.DEAD]

    def next_deadline(self) -> float | None:
        """The earliest time after the latest ``now`` seen at which some peer's verdict changes.

        A thin trio task can sleep until then (or its next tick, if sooner) and
        re-run the election; None when there are no peers.
        """
        if self._now is None:
            return None
        times = []
        for entry in self._peers.values():
            seen = entry.last_seen
            forget = seen + self.dead_after + self.forget_after
            for t in (seen + self.suspect_after, seen + self.dead_after, forget, forget + self.forget_after):
                if t > self._now:
                    times.append(t)
                    break
        return min(times, default=None)

    def leader(
        self,
        now: float,
        current: str | None = None,
        *,
        threshold: int = DEFAULT_THRESHOLD,
        bucket_size: int = DEFAULT_BUCKET_SIZE,
    ) -> str | None:
        """Whom to follow: ``elect_leader`` over ourselves and the ALIVE peers (R7, R8).

        The incumbent is the best live claimant (a node whose record names itself
        as leader) that passes the threshold; ``current`` serves only when nobody
        claims. Publish the result with ``set_leader`` so peers see the claim.
        """
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        # Only ALIVE peers stand: a leader that stopped heartbeating is replaced
        # once it turns SUSPECT (5 s), not DEAD (15 s), so a dead uplink node
        # costs a few heartbeat periods. A false suspicion costs a handover,
        # which costs egress only (two leaders are safe).
        records = [self._self, *(r for r in self.live_peers(now) if self.state(r.node_id, now) is PeerState.ALIVE)]
        claimants = [r for r in records if r.leader == r.node_id and r.uplink_score >= threshold]
        incumbent = current
        if claimants:
            incumbent = max(claimants, key=lambda r: (r.uplink_score // bucket_size, r.node_id)).node_id
        return elect_leader(
            [(r.node_id, r.uplink_score) for r in records],
            incumbent,
            threshold=threshold,
            bucket_size=bucket_size,
        )


# --- gossip targets and election -----------------------------------------------


def choose_gossip_targets(
    rng: random.Random,
    peers: Sequence[str],
    fanout: int,
    *,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Pick up to ``fanout`` distinct peers to gossip with this round.

    Candidates are de-duplicated and sorted before drawing, so with a seeded,
    per-node ``rng`` the choice depends only on the seed and the set of peers,
    never on dict or set order or on which trio task ran first (STYLE rule 11).

    Args:
        rng: the node's own random source.
        peers: candidate node ids (typically ``[r.node_id for r in live_peers(now)]``).
        fanout: how many to pick at most.
        exclude: ids never to pick (ourselves, the peer that just sent to us).

    Returns:
        Up to ``fanout`` ids, in the order drawn.

    Raises:
        ValueError: ``fanout`` is negative.
    """
    if fanout < 0:
        raise ValueError(f"fanout must be >= 0, got {fanout}")
    skip = set(exclude)
    candidates = sorted({p for p in peers if p not in skip})
    return rng.sample(candidates, min(fanout, len(candidates)))


def elect_leader(
    candidates: Iterable[tuple[str, int]],
    current: str | None,
    *,
    threshold: int = DEFAULT_THRESHOLD,
    bucket_size: int = DEFAULT_BUCKET_SIZE,
) -> str | None:
    """The leader for a set of live nodes, deterministically (R7).

    Args:
        candidates: ``(node_id, uplink_score)`` of every live node, ourselves
            included. A node listed twice counts with its higher score.
        current: the incumbent, or None.
        threshold: lowest score that may lead.
        bucket_size: width of a score class; also the margin by which a
            challenger must beat a healthy incumbent.

    Returns:
        The leader's node id, or None when no candidate passes the threshold.

    Raises:
        ValueError: a score is outside 0-100, or ``bucket_size`` is below 1.
    """
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    scores: dict[str, int] = {}
    for node_id, score in candidates:
        if type(node_id) is not str:
            raise ValueError(f"node ids must be strings, got {type(node_id).__name__}")
        if type(score) is not int or not 0 <= score <= 100:
            raise ValueError(f"uplink score of {node_id!r} must be an int in 0-100, got {score!r}")
        scores[node_id] = max(score, scores.get(node_id, 0))
    eligible = {nid: s for nid, s in scores.items() if s >= threshold}
    if not eligible:
        return None

    def rank(nid: str) -> tuple[int, str]:
        return (eligible[nid] // bucket_size, nid)

    if current is None or current not in eligible:
        return max(eligible, key=rank)
    better = [nid for nid, s in eligible.items() if s >= eligible[current] + bucket_size]
    if not better:
        return current
    return max(better, key=rank)
