"""Membership, failure detection, gossip-target choice and leader election, sans-IO.

Nothing in this module opens a socket, calls trio or reads a clock: time comes in
as ``now`` (seconds on the node's monotonic clock, ``trio.current_time()`` at the
edge) and every decision is returned to the caller. A thin trio task calls
``Membership.tick(now)`` every heartbeat period, attaches ``piggyback(now, limit)``
to every message it sends, feeds the records it receives to ``merge(records,
now)``, compares ``digest(now)`` with a peer's and sends ``records_for_gossip(now)``
only when they differ, asks ``choose_gossip_targets`` whom to talk to, asks
``leader(now)`` who forwards to the cloud, and sleeps until ``next_deadline()``
or its next tick. The default scheme (the node's) is SWIM (Das, Gupta
and Motivala, DSN 2002) as hashicorp/memberlist runs it, with link-state
reachability for a multi-hop mesh (R11, R12); the other is the gossip-style
failure detector of van Renesse, Minsky and Hayden ("A Gossip-Style Failure
Detection Service", Middleware 1998) with SWIM's incarnation numbers for
refutation (section 4.2).

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
R7. Election (``choose_leader``, used by ``Membership.leader``): the electorate is
    ourselves and every live (ALIVE or SUSPECT) peer; eligible are those whose
    uplink score is at least ``threshold``; a *claimant* is an eligible node whose
    own record names itself as ``leader``. Rank is ``(score // bucket_size,
    node_id)``. (a) Among claimants the best rank is the incumbent; every other
    claimant stands down when it sees it. (b) The incumbent keeps the role unless
    an eligible node scores at least ``bucket_size`` points above it; then the
    best such node by rank takes over. Stickiness thus applies only against
    non-claimants, never between claimants. (c) With no claimant, the best
    eligible node by rank. Scores that jitter by less than half a bucket never
    move the role; a clearly better uplink (a whole bucket), an incumbent below
    the threshold, or a DEAD one always does.
R8. The decision is a function of the view alone: no node's memory of whom it
    followed enters it (``Membership.leader``'s ``current`` is ignored). Nodes
    whose views hold the same live, eligible records and claims elect the same
    leader. Once the winner's own claim (``set_leader``) is seen, the answer is
    the winner whatever other claims are still seen or already withdrawn (it
    outranks every claimant, and no eligible node is a bucket above it), so
    agreement, once reached, holds while the inputs hold.
    Bound: if every record change reaches every node within ``D`` seconds, all
    nodes follow one leader at most ``2 D`` after the last change of scores,
    claims or liveness, and at most ``dead_after + 2 D`` after a leader fails
    (docs/membership.md, docs/uplink.md). SUSPECT peers vote and stand: SUSPECT
    begins at different moments on different nodes, because heartbeats travel
    several hops, and standing a leader down on SUSPECT split the mesh between
    two leaders (issue 10, items 4 and 7).
R9. Delta gossip (memberlist's ``TransmitLimitedQueue``): ``piggyback`` returns
    our own record, then queued updates, then heartbeat refreshes, within a
    caller's ``limit``. ``merge`` queues what is news: a new member, a record
    whose incarnation, score, leader, address or version changed, a peer back from
    forgotten (back from SUSPECT or DEAD is a refresh, see ``merge``). A queued
    update is sent at most
    ``retransmit_mult * ceil(log10(N + 1))`` times (N: live members with us), least
    sent and then newest first; a newer update of the same node replaces it. A
    heartbeat-only advance is a refresh: passed on ``refresh_sends`` times, with
    room left, those of nodes that may lead first.
    ``digest`` hashes what the election reads (the live members, their
    incarnations, claims and score classes; no heartbeats, no ALIVE/SUSPECT), so
    idle peers compare 12 bytes and exchange ``records_for_gossip`` only when
    they differ.
R10. No work twice: records are checked once, when built or parsed (our own
    record's setters check only the value they change). Verdicts, the sorted live
    list, the leader and the digest are cached and recomputed only when a record
    changes state or content or a verdict deadline passes (``next_deadline``).
R11. The SWIM detector (``detector="swim"``; docs/membership.md): no heartbeats
    (``tick`` raises nothing); a peer is ALIVE until suspected. ``suspect`` (the
    caller's probe of a direct neighbour failed, or discovery says it left)
    starts a suspicion, a record with ``status`` 1 at the peer's incarnation;
    records order by ``(incarnation, status, heartbeat)``, so a suspicion, and a
    death notice (status 2) above it, beat the node's life at that incarnation,
    and only its refutation (R5, ``incarnation + 1``) clears them. SUSPECT runs
    ``suspicion_timeout`` from when we first heard it, then DEAD (the record
    becomes a death notice), forgotten and dropped as in R3. Everything that
    changes is news (R9); death notices are gossiped (unlike R4).
    ``piggyback(repair=True)`` adds slices of the whole view after the news, for
    a peer whose digest differs. Direct contact with a SUSPECT or DEAD peer
    re-queues what we believe so that it refutes.
R12. Reachability (SWIM detector, once the caller reports links with
    ``set_neighbours``): every record lists its node's direct neighbours
    (``neighbours``, 8-byte id hashes; a change is news and moves the digest). A
    link between two peers counts when both ends' records list it; our own links
    are the ones we report. A member that no path of counted links reaches from us,
    through members whose own record stands (a suspected or dead member relays
    nothing), is SUSPECT from that moment and DEAD ``suspicion_timeout`` later,
    on the suspicion's clock; a path back before then makes it ALIVE again.
    This is our own inference from records everyone on our side holds, so it is
    not gossiped: no death notice, no record of a member only it holds DEAD, no
    tombstone (dropped ``forget_after`` after DEAD); a path back revives it
    without a refutation. Why: a SWIM node probes only its neighbours, so across
    a multi-hop cut the far nodes were never suspected and kept their claims;
    the near end of every cut link drops it from its record, which reaches our
    whole side, while the far end's stale record cannot keep the link alone.
    The counted links and a tree of the reached members are kept up to date as
    records change (R10): a change re-derives only the part of the tree it moved,
    with the full walk's answer (``_reach``, ``_reachable``).

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
5. ``records_for_gossip`` holds ourselves and ALIVE or SUSPECT peers only (R4;
   the SWIM detector adds death notices, R11, never a member that only our
   reachability holds DEAD, R12).
6. ``MemberRecord`` cannot hold an out-of-range field; ``from_wire`` either
   returns a valid record or raises ``MembershipError`` and changes nothing.
7. ``elect_leader`` and ``choose_gossip_targets`` are pure: the same inputs, as
   sets, give the same output (and the same random draws) whatever their order.
8. ``piggyback`` starts with our current record, returns at most ``limit``
   records, never a DEAD one (SWIM: death notices, R11), and sends no queued
   update more than ``retransmit_limit`` times (R9).
9. Every cached verdict (``view``, ``live_peers``, ``records_for_gossip``,
   ``leader``, ``next_deadline``, ``digest``) equals a fresh evaluation of the
   rules at the same ``now``, after any sequence of inputs (R10).
10. ``choose_leader`` is a function of the set of live records alone; in a
    connected mesh whose nodes keep exchanging records, all nodes follow one
    leader within ``2 D`` of the last change of its inputs and keep it (R8).

Defaults, and why
-----------------

- Heartbeat every 1 s (the caller's tick, or ``heartbeat_period`` when the record is
  sent) matches the gossip period of DESIGN.md, so each gossip round carries a fresh
  heartbeat.
- ``refresh_sends = 1`` here; the node passes 6 (docs/membership.md, "Delta gossip"):
  a heartbeat passed on once travels as a single random walk.
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
- ``retransmit_mult = 4``: memberlist's LAN default. With N = 30 an update is
  sent 8 times by each node that holds it, 12 times at N = 200; a lost datagram
  (5 % in the festival scenario) costs one of those, and what still goes
  missing shows as a differing ``digest`` and is settled by a full exchange.
- ``bucket_size = 20``: five coarse classes of uplink, and the margin a challenger
  needs. It absorbs a score jitter of up to 9 points per node (two nodes that
  wobble in opposite directions stay under 20 apart) and still hands over for a
  clearly better uplink. This assumes the uplink score's noise stays within that
  band; measure it and retune here (docs/membership.md).
"""

from __future__ import annotations

import bisect
import enum
import functools
import hashlib
import heapq
import itertools
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_BUCKET_SIZE",
    "DEFAULT_DEAD_AFTER",
    "DEFAULT_FORGET_AFTER",
    "DEFAULT_RETRANSMIT_MULT",
    "DEFAULT_SUSPECT_AFTER",
    "DEFAULT_THRESHOLD",
    "DETECTORS",
    "DIGEST_SIZE",
    "MAX_ADDRESS_LEN",
    "MAX_COUNTER",
    "MAX_NEIGHBOURS",
    "MAX_NODE_ID_LEN",
    "MAX_VERSION_LEN",
    "MemberRecord",
    "MemberView",
    "Membership",
    "MembershipError",
    "NEIGHBOUR_HASH_LEN",
    "PeerState",
    "choose_gossip_targets",
    "choose_leader",
    "elect_leader",
    "neighbour_hash",
    "retransmit_limit",
]

DEFAULT_SUSPECT_AFTER = 5.0
DEFAULT_DEAD_AFTER = 15.0
DEFAULT_FORGET_AFTER = 300.0
DEFAULT_THRESHOLD = 50
DEFAULT_BUCKET_SIZE = 20
DEFAULT_RETRANSMIT_MULT = 4
DETECTORS = ("heartbeat", "swim")
DIGEST_SIZE = 12

MAX_COUNTER = 2**63 - 1
"""Largest incarnation or heartbeat: fits a CBOR uint64, a SQLite INTEGER and an int64."""

MAX_NODE_ID_LEN = 128
MAX_ADDRESS_LEN = 300
"""A 253-character DNS name, a colon and a port, with room for a bracketed IPv6 literal."""
MAX_VERSION_LEN = 64
MAX_WIRE_KEYS = 16
"""A record map may carry fields a newer version adds (they are ignored), but not many."""
NEIGHBOUR_HASH_LEN = 8
"""Bytes of one neighbour's id hash in ``MemberRecord.neighbours`` (BLAKE2b, R12)."""
MAX_NEIGHBOURS = 128
"""Most neighbours one record lists (R12): a radio mesh has about ten; a node with more
lists the ``MAX_NEIGHBOURS`` links of smallest pair hash, a choice both ends agree on."""

_WIRE_KEYS = {
    "node_id": "id",
    "incarnation": "inc",
    "heartbeat": "hb",
    "uplink_score": "up",
    "address": "addr",
    "version": "ver",
    "leader": "ldr",
}

ALIVE_ST, SUSPECT_ST, DEAD_ST = 0, 1, 2
"""``MemberRecord.status`` (wire key ``st``, absent when 0): a record as its node wrote
it, or (SWIM detector, R11) a suspicion or a death notice about it at that incarnation."""


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


@functools.lru_cache(maxsize=8192)
def _texts_ok(node_id: str, address: str, version: str, leader: str | None) -> bool:
    """Whether a record's text fields pass their checks (cached: they repeat every round)."""
    try:
        _check_text("node_id", node_id, MAX_NODE_ID_LEN)
        _check_address(address)
        _check_text("version", version, MAX_VERSION_LEN)
        if leader is not None:
            _check_text("leader", leader, MAX_NODE_ID_LEN)
    except MembershipError:
        return False
    return True


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


def _check_neighbours(value: object) -> bytes:
    if type(value) is not bytes:
        raise MembershipError(f"neighbours must be bytes, got {type(value).__name__}")
    if len(value) % NEIGHBOUR_HASH_LEN:
        raise MembershipError(f"neighbours must be {NEIGHBOUR_HASH_LEN}-byte hashes, got {len(value)} bytes")
    if len(value) > NEIGHBOUR_HASH_LEN * MAX_NEIGHBOURS:
        raise MembershipError(f"neighbours lists {len(value) // NEIGHBOUR_HASH_LEN}, at most {MAX_NEIGHBOURS} allowed")
    return value


@functools.lru_cache(maxsize=16384)
def neighbour_hash(node_id: str) -> bytes:
    """The 8-byte hash by which records list a neighbour (R12): BLAKE2b of the id."""
    return hashlib.blake2b(node_id.encode(), digest_size=NEIGHBOUR_HASH_LEN, person=b"meshnode-nb").digest()


def _pair_rank(a: str, b: str) -> bytes:
    # The same for both ends of a link: a node with too many neighbours lists the links
    # of smallest rank, and its neighbour does the same, so both keep the same links.
    lo, hi = sorted((a, b))
    return hashlib.blake2b(f"{lo}\0{hi}".encode(), digest_size=8).digest()


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
    status: int = ALIVE_ST
    neighbours: bytes = b""
    """R12: the node's direct neighbours as it reports them, concatenated 8-byte id hashes
    (``neighbour_hash``), sorted; empty for the heartbeat detector (wire ``nb``, absent when empty)."""

    def __post_init__(self) -> None:
        _check_text("node_id", self.node_id, MAX_NODE_ID_LEN)
        _check_counter("incarnation", self.incarnation, MAX_COUNTER)
        _check_counter("heartbeat", self.heartbeat, MAX_COUNTER)
        _check_counter("uplink_score", self.uplink_score, 100)
        _check_address(self.address)
        _check_text("version", self.version, MAX_VERSION_LEN)
        if self.leader is not None:
            _check_text("leader", self.leader, MAX_NODE_ID_LEN)
        _check_counter("status", self.status, DEAD_ST)
        _check_neighbours(self.neighbours)

    def neighbour_set(self) -> frozenset[bytes]:
        """The hashes in ``neighbours``, as a set (built once per record, R10)."""
        found = self.__dict__.get("_nbset")
        if found is None:
            nb, n = self.neighbours, NEIGHBOUR_HASH_LEN
            found = self.__dict__["_nbset"] = frozenset(nb[i : i + n] for i in range(0, len(nb), n))
        return found

    @property
    def key(self) -> tuple[int, int]:
        """``(incarnation, heartbeat)``: the order in which records of one node supersede."""
        return (self.incarnation, self.heartbeat)

    def _order(self) -> tuple[int, int, int, int, str, str, bool, str, bytes]:
        # R1: the key decides; the rest only breaks ties that honest nodes never create.
        # R11: at one incarnation a death notice beats a suspicion beats the node's own
        # record (memberlist's order), whatever the heartbeat: only the node's
        # refutation, a higher incarnation, clears them.
        return (
            self.incarnation,
            self.status,
            self.heartbeat,
            self.uplink_score,
            self.address,
            self.version,
            self.leader is not None,
            self.leader or "",
            self.neighbours,
        )

    def _evolve(self, **changes: Any) -> MemberRecord:
        # `dataclasses.replace` without the checks, for our own record: the setters
        # have checked the one value they change, the rest was checked before (R10).
        new = object.__new__(MemberRecord)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        new.__dict__.pop("_wire", None)  # the cached map and set are the old record's
        new.__dict__.pop("_nbset", None)
        return new

    def supersedes(self, other: MemberRecord) -> bool:
        """Whether this record replaces ``other`` (same node) in a merge (R1)."""
        return self._order() > other._order()

    def to_wire(self) -> dict[str, Any]:
        """A plain dict (CBOR- and JSON-able) with short keys; ``leader`` is null when unset.

        A record is gossiped many times: the map is built once and a copy handed out (R10).
        """
        wire = self.__dict__.get("_wire")
        if wire is None:
            wire = self.__dict__["_wire"] = {short: getattr(self, name) for name, short in _WIRE_KEYS.items()}
            if self.status != ALIVE_ST:
                wire["st"] = self.status
            if self.neighbours:
                wire["nb"] = self.neighbours
        return dict(wire)

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
        try:
            node_id, incarnation, heartbeat = obj["id"], obj["inc"], obj["hb"]
            score, address, version = obj["up"], obj["addr"], obj["ver"]
        except KeyError:
            missing = next(short for short in _WIRE_KEYS.values() if short != "ldr" and short not in obj)
            name = next(n for n, short in _WIRE_KEYS.items() if short == missing)
            raise MembershipError(f"member record lacks {missing!r} ({name})") from None
        leader = obj.get("ldr")
        status = obj.get("st", ALIVE_ST)
        neighbours = obj.get("nb", b"")
        # R10: the text fields of a node's record repeat in every gossip round; one
        # cached check per distinct combination, the counters checked each time.
        if (
            type(incarnation) is int and 0 <= incarnation <= MAX_COUNTER
            and type(heartbeat) is int and 0 <= heartbeat <= MAX_COUNTER
            and type(score) is int and 0 <= score <= 100
            and type(node_id) is str and type(address) is str and type(version) is str
            and (leader is None or type(leader) is str)
            and type(status) is int and 0 <= status <= DEAD_ST
            and type(neighbours) is bytes and len(neighbours) % NEIGHBOUR_HASH_LEN == 0
            and len(neighbours) <= NEIGHBOUR_HASH_LEN * MAX_NEIGHBOURS
            # Lengths first: nothing overlong reaches (and stays in) the cache.
            and len(node_id) <= MAX_NODE_ID_LEN and len(address) <= MAX_ADDRESS_LEN
            and len(version) <= MAX_VERSION_LEN and (leader is None or len(leader) <= MAX_NODE_ID_LEN)
            and _texts_ok(node_id, address, version, leader)
        ):  # fmt: skip
            record = object.__new__(cls)
            record.__dict__.update(
                node_id=node_id, incarnation=incarnation, heartbeat=heartbeat, uplink_score=score,
                address=address, version=version, leader=leader, status=status, neighbours=neighbours,
            )  # fmt: skip
            return record
        # Something is wrong: the constructor's checks say what.
        return cls(node_id, incarnation, heartbeat, score, address, version, leader, status, neighbours)


class MemberView(NamedTuple):
    """One row of ``Membership.view``: the record, the verdict, and seconds since last seen."""

    record: MemberRecord
    state: PeerState
    age: float


# --- the peer table -----------------------------------------------------------


_LIVE = (PeerState.ALIVE, PeerState.SUSPECT)
_BY_RANK = (PeerState.ALIVE, PeerState.SUSPECT, PeerState.DEAD)


_DIGEST_MOD = 2**128


def _digest_row(record: MemberRecord, threshold: int, bucket_size: int) -> int:
    # One live member's term (R9). Not its ALIVE/SUSPECT verdict: SUSPECT is live for
    # the election and for gossip, and it begins at different moments on different
    # nodes (heartbeats travel hops), so hashing it made idle neighbours differ all the time.
    node_id = record.node_id.encode()
    h = hashlib.blake2b(digest_size=16)
    h.update(len(node_id).to_bytes(1, "big") + node_id + record.incarnation.to_bytes(8, "big"))
    h.update(b"L" if record.leader == record.node_id else b"-")
    h.update(b"E" if record.uplink_score >= threshold else b"-")
    h.update((record.uplink_score // bucket_size).to_bytes(1, "big"))
    h.update(record.neighbours)  # R12: links decide reachability (empty for the heartbeat detector)
    return int.from_bytes(h.digest(), "big")


def _news(record: MemberRecord, old: MemberRecord) -> bool:
    # R9: what is news about a node (queued, retransmitted), beyond a heartbeat advance.
    return (
        record.incarnation != old.incarnation
        or record.uplink_score != old.uplink_score
        or record.leader != old.leader
        or record.address != old.address
        or record.version != old.version
        or record.neighbours != old.neighbours
    )


def retransmit_limit(retransmit_mult: int, members: int) -> int:
    """How many times one update is piggybacked: ``mult * ceil(log10(members + 1))``.

    hashicorp/memberlist's ``retransmitLimit`` (``util.go``): an epidemic reaches
    all ``n`` nodes with high probability after O(log n) rounds of each infected
    node passing it on, so the budget grows with the logarithm of the mesh, never
    below ``mult`` (a mesh of one still tells its first peer).
    """
    return retransmit_mult * max(1, math.ceil(math.log10(members + 1)))


@dataclass(slots=True)
class _Entry:
    record: MemberRecord
    last_changed: float
    last_direct: float = -math.inf
    state: PeerState | None = PeerState.ALIVE
    """The verdict as of the latest ``now`` (None: forgotten); kept by ``Membership._advance``."""
    due: float = math.inf
    """When this entry's heap item is due: at or before its next verdict change."""
    row: int = 0
    """Its term in the digest's sum (0 while it is not ALIVE or SUSPECT)."""
    suspected_at: float | None = None
    """SWIM detector (R11): when we began to suspect it (None: not suspected)."""
    unreachable_since: float | None = None
    """SWIM detector (R12): since when no path of reported links leads to it from us."""

    @property
    def last_seen(self) -> float:
        return max(self.last_changed, self.last_direct)


class Membership:
    """The local view of the mesh: our own record and what we know of every peer.

    Every input (``tick``, ``merge``, ``observe_direct``, the setters) first
    updates state, then the verdicts are brought up to date; every verdict
    (``state``, ``view``, ``live_peers``, ``leader``, ``digest``) is a function of
    the stored entries and the ``now`` passed in. The clock must not run
    backwards between calls (``state`` and ``view`` still answer exactly for an
    earlier ``now``, by recomputing).

    Nothing is recomputed twice (R10): the verdicts, the sorted live list, the
    leader and the digest are cached, and recomputed only when a record changes
    state or content or when the earliest verdict deadline (``next_deadline``)
    passes. A heartbeat that advances for an ALIVE peer patches its slot in the
    cached lists in place.

    Args:
        self_record: our record as we start. A node that comes back must start at
            a higher incarnation than it ever used (persist ``self_record.incarnation``
            whenever it changes, refutation included), or peers ignore it until its
            heartbeat passes the old one.
        suspect_after: seconds without a heartbeat advance before SUSPECT.
        dead_after: seconds without one before DEAD.
        forget_after: seconds a DEAD peer stays in the view; its tombstone is kept
            as long again.
        retransmit_mult: memberlist's ``RetransmitMult``: each queued update is
            piggybacked at most ``retransmit_mult * ceil(log10(N + 1))`` times (R9).
        threshold: the election's default lowest score that may lead (R7).
        bucket_size: the election's default score class width (R7); the digest
            carries scores at this granularity.
        heartbeat_period: if set, ``piggyback`` raises our heartbeat itself when
            the last raise is at least this old, so a caller whose ticks are
            rarer than its heartbeat period (an idle node) still sends a
            heartbeat that is at most one period old.
        refresh_sends: how many times a peer's heartbeat advance is passed on
            (R9). Once, a heartbeat travels as a random walk that dies where it
            meets a copy; a few times, as an epidemic.

    Raises:
        ValueError: the timeouts are not ``0 < suspect_after < dead_after`` and
            ``forget_after > 0``, or ``retransmit_mult``, ``bucket_size`` are below 1.
    """

    def __init__(
        self,
        self_record: MemberRecord,
        *,
        suspect_after: float = DEFAULT_SUSPECT_AFTER,
        dead_after: float = DEFAULT_DEAD_AFTER,
        forget_after: float = DEFAULT_FORGET_AFTER,
        retransmit_mult: int = DEFAULT_RETRANSMIT_MULT,
        threshold: int = DEFAULT_THRESHOLD,
        bucket_size: int = DEFAULT_BUCKET_SIZE,
        heartbeat_period: float | None = None,
        refresh_sends: int = 1,
        detector: str = "heartbeat",
        suspicion_timeout: float | None = None,
    ) -> None:
        if not isinstance(self_record, MemberRecord):
            raise TypeError(f"self_record must be a MemberRecord, got {type(self_record).__name__}")
        if not (0 < suspect_after < dead_after and math.isfinite(dead_after)):
            raise ValueError("need 0 < suspect_after < dead_after (finite)")
        if not (0 < forget_after and math.isfinite(forget_after)):
            raise ValueError("need 0 < forget_after (finite)")
        if type(retransmit_mult) is not int or retransmit_mult < 1:
            raise ValueError(f"retransmit_mult must be an int >= 1, got {retransmit_mult!r}")
        if type(bucket_size) is not int or bucket_size < 1:
            raise ValueError(f"bucket_size must be an int >= 1, got {bucket_size!r}")
        _check_counter("threshold", threshold, 101)
        if heartbeat_period is not None and not (0 < heartbeat_period and math.isfinite(heartbeat_period)):
            raise ValueError(f"heartbeat_period must be a positive number or None, got {heartbeat_period!r}")
        if detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
        self.detector = detector
        self._swim = detector == "swim"
        if suspicion_timeout is None:
            suspicion_timeout = dead_after - suspect_after
        if not (0 < suspicion_timeout and math.isfinite(suspicion_timeout)):
            raise ValueError(f"suspicion_timeout must be a positive number, got {suspicion_timeout!r}")
        self.suspicion_timeout = float(suspicion_timeout)
        self._cursor = ""  # R11: where the next repair fill goes on in the sorted ids
        # R12: our direct neighbours (None: the caller reports none, reachability is off),
        # every entry by the hash its neighbours list it under, and whether a link or a
        # relay changed since reachability was last computed.
        self._direct: frozenset[str] | None = None
        self._by_hash: dict[bytes, str] = {}
        self._reach_dirty = False
        # R12, kept up to date rather than recomputed (`_reach`): the counted links between
        # peers, and a tree of the reached peers (each one's parent: the peer it was reached
        # through, "" for a direct neighbour) that witnesses every path. Changes since the last
        # `_reach`: peers whose own standing changed (re-derived with all that hangs from them)
        # and peers a new link, a new entry or a new direct neighbour may have made reachable.
        self._adj: dict[str, set[str]] = {}
        self._lists: dict[str, frozenset[bytes]] = {}  # each peer's listed hashes, as last linked
        self._parent: dict[str, str] = {}
        self._children: dict[str, set[str]] = {}
        self._orphans: set[str] = set()
        self._attach: set[str] = set()
        self._full_reach = False  # two ids with one neighbour hash: the links are ambiguous, recompute in full
        self._self = self_record
        self.heartbeat_period = heartbeat_period
        if type(refresh_sends) is not int or refresh_sends < 1:
            raise ValueError(f"refresh_sends must be an int >= 1, got {refresh_sends!r}")
        self.refresh_sends = refresh_sends
        self._beat_at = -math.inf
        self.suspect_after = float(suspect_after)
        self.dead_after = float(dead_after)
        self.forget_after = float(forget_after)
        self.retransmit_mult = retransmit_mult
        self.threshold = threshold
        self.bucket_size = bucket_size
        self._peers: dict[str, _Entry] = {}
        self._now: float | None = None
        # Caches (R10), kept exact by every input and by `_advance` (no full rebuilds):
        self._heap: list[tuple[float, str]] = []  # (due, node id): one live item per entry
        self._ids: list[str] = []  # every entry's id (tombstones too), sorted
        self._live: list[MemberRecord] = []  # ALIVE and SUSPECT peers, sorted by id
        self._live_ids: list[str] = []
        self._digest_sum = 0  # sum of the live peers' digest rows, mod 2**128
        self._rows_stale: set[str] = set()  # peers whose row must be re-hashed before the next digest
        self._version = 0  # bumped whenever something the election or the digest reads changes
        self._leader_cache: tuple[tuple[object, ...], str | None] | None = None
        # Delta gossip (R9): node id -> [times sent, sequence]; and the peers whose
        # heartbeat advanced since we last passed their record on (oldest first).
        self._queue: dict[str, list[int]] = {}
        self._qheap: list[tuple[int, int, str]] = []
        self._seq = 0
        self._fresh: dict[str, int] = {}  # node id -> sends left of its latest heartbeat
        self._fresh_first: dict[str, int] = {}  # refreshes of nodes that may lead: sent first

    # -- our own record --------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._self.node_id

    @property
    def self_record(self) -> MemberRecord:
        """Our current record (persist its incarnation when it changes)."""
        return self._self

    def _set_self(self, record: MemberRecord) -> MemberRecord:
        old = self._self
        self._self = record
        if (old.incarnation, old.uplink_score, old.leader) != (record.incarnation, record.uplink_score, record.leader):
            self._version += 1
        return record

    def _bump(self, **changes: Any) -> MemberRecord:
        # R6: every change raises the key; a heartbeat at its ceiling rolls into a new incarnation.
        record = self._self
        if record.heartbeat < MAX_COUNTER:
            new = record._evolve(heartbeat=record.heartbeat + 1, **changes)
        else:
            new = record._evolve(incarnation=record.incarnation + 1, heartbeat=0, **changes)
        return self._set_self(new)

    def tick(self, now: float) -> MemberRecord:
        """Raise our heartbeat (call once per heartbeat period) and return our new record.

        The SWIM detector (R11) has no heartbeats: there ``tick`` only brings the
        verdicts to ``now`` and returns our record unchanged.
        """
        self._advance(now)
        self._beat_at = now
        if self._swim:
            return self._self
        return self._bump()

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
        """Publish whom we follow (ourselves if we lead); peers read claims from it (R8)."""
        if leader is not None:
            _check_text("leader", leader, MAX_NODE_ID_LEN)
        if leader == self._self.leader:
            return self._self
        return self._bump(leader=leader)

    def set_neighbours(self, node_ids: Iterable[str]) -> MemberRecord:
        """Publish our direct neighbours (the verified peers we exchange with), R12.

        SWIM detector only (the heartbeat detector ignores it and returns our record):
        the record lists their hashes, so every node can tell which members a path of
        live links still reaches; a change raises the heartbeat and spreads as news.
        Calling it turns reachability on: from then on a member no path reaches is
        SUSPECT, and DEAD ``suspicion_timeout`` later. Cheap when nothing changed
        (the node calls it after every input).
        """
        if not self._swim:
            return self._self
        own = self._self.node_id
        ids = frozenset(node_ids)
        if own in ids:
            ids -= {own}
        if ids == self._direct:
            return self._self
        changed = set(self._peers) if self._direct is None else ids ^ self._direct
        self._orphans |= changed
        self._attach |= changed
        self._direct = ids
        self._reach_dirty = True
        chosen: Iterable[str] = ids
        if len(ids) > MAX_NEIGHBOURS:
            chosen = sorted(ids, key=lambda peer: _pair_rank(own, peer))[:MAX_NEIGHBOURS]
        packed = b"".join(sorted(neighbour_hash(peer) for peer in chosen))
        if packed == self._self.neighbours:
            return self._self
        return self._bump(neighbours=packed)

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
        return self._set_self(self._self._evolve(incarnation=incarnation, heartbeat=0))

    # -- inputs from peers -----------------------------------------------------

    def merge(self, records: Iterable[MemberRecord], now: float) -> list[str]:
        """Fold gossiped records into the view (R1, R2, R5) and queue what is news (R9).

        Args:
            records: parsed records (``MemberRecord.from_wire``), ours included or not.
            now: local time of arrival.

        Returns:
            The sorted ids whose visible record changed; our own id if we refuted.
        """
        self._advance(now)
        changed: set[str] = set()
        if self._swim:
            self._merge_swim(records, now, changed)
        else:
            self._merge_heartbeat(records, now, changed)
        return sorted(changed)

    def _incoming(
        self, records: Iterable[MemberRecord], changed: set[str]
    ) -> Iterator[tuple[MemberRecord, _Entry | None]]:
        # What both detectors' merges share: type check, refutation (R5), the entry if any.
        own_id = self._self.node_id
        peers = self._peers
        for record in records:
            if type(record) is not MemberRecord:
                raise TypeError(f"merge takes MemberRecord, got {type(record).__name__}")
            if record.node_id == own_id:
                if self._refute(record):
                    changed.add(own_id)
                continue
            yield record, peers.get(record.node_id)

    def _new_entry(self, record: MemberRecord, now: float, changed: set[str]) -> _Entry:
        node_id = record.node_id
        entry = self._peers[node_id] = _Entry(record, now, state=None)
        bisect.insort(self._ids, node_id)
        mine = neighbour_hash(node_id)
        if self._by_hash.setdefault(mine, node_id) != node_id:
            self._by_hash[mine] = node_id
            self._full_reach = True  # R12: an 8-byte hash shared by two ids; see `_reach`
        changed.add(node_id)
        if self._swim:
            self._adj[node_id] = set()
            self._attach.add(node_id)
            self._relink(node_id)
        return entry

    def _merge_heartbeat(self, records: Iterable[MemberRecord], now: float, changed: set[str]) -> None:
        for record, entry in self._incoming(records, changed):
            node_id = record.node_id
            if entry is None:
                entry = self._new_entry(record, now, changed)
                self._seen(entry, now)
                self._enqueue(node_id)
                continue
            old = entry.record
            if record.incarnation == old.incarnation:
                if record.heartbeat < old.heartbeat:
                    continue
                newer = record.heartbeat > old.heartbeat
                if not newer and not record.supersedes(old):
                    continue
            elif record.incarnation < old.incarnation:
                continue
            else:
                newer = True
            was = entry.state
            entry.record = record
            if was is None and not newer:
                continue  # a tie-break winner for a forgotten entry: kept, not shown (R3)
            changed.add(node_id)
            if newer and now > entry.last_changed:
                entry.last_changed = now
                if was is not PeerState.ALIVE:
                    self._seen(entry, now)
                    if was is None:
                        self._enqueue(node_id)  # back from forgotten: news (R9)
                    elif node_id not in self._queue:
                        # Back from SUSPECT or DEAD: a refresh (R9). A DEAD verdict is
                        # mostly our own timeout on a far node whose heartbeats came
                        # slowly while others held it live; as news, each such flip
                        # took 12-16 sends of every holder, crowded the heartbeats out
                        # and caused more flips (bench/sim.py, 50 nodes).
                        self._refresh(record)
            if _news(record, old):
                if entry.state in _LIVE:  # R4: a DEAD record is neither gossiped nor hashed
                    self._enqueue(node_id)
                    self._set_row(entry)
            elif newer and node_id not in self._queue and entry.state in _LIVE:
                self._refresh(record)
            if entry.state in _LIVE:
                self._live[bisect.bisect_left(self._live_ids, node_id)] = record

    def _merge_swim(self, records: Iterable[MemberRecord], now: float, changed: set[str]) -> None:
        # R11: records order by (incarnation, status, heartbeat); a suspicion starts our
        # own timer, a death notice makes the peer DEAD at once, and only a higher
        # incarnation (the node's refutation) brings it back. What changes is news.
        # R12: a new member, or a change of links or status, moves reachability.
        for record, entry in self._incoming(records, changed):
            node_id = record.node_id
            if entry is None:
                entry = self._new_entry(record, now, changed)
                if record.status == SUSPECT_ST:
                    entry.suspected_at = now
                elif record.status == DEAD_ST:
                    # Kept, DEAD: a copy of its life at that incarnation, heard later,
                    # must not make it ALIVE (the merge's order does not matter).
                    entry.suspected_at = now - self.suspicion_timeout
                self._reevaluate(entry, now)
                self._enqueue(node_id)
                self._reach_dirty = True
                continue
            old = entry.record
            if not record.supersedes(old):
                continue
            if entry.state is None and record.incarnation <= old.incarnation:
                continue  # forgotten: only a new life (a higher incarnation) brings it back (R3)
            entry.record = record
            if record.status == ALIVE_ST:
                entry.suspected_at = None
            elif record.status == SUSPECT_ST:
                if old.status != SUSPECT_ST or old.incarnation != record.incarnation or entry.suspected_at is None:
                    entry.suspected_at = now
            else:
                dead_at = now - self.suspicion_timeout
                if entry.suspected_at is None or entry.suspected_at > dead_at:
                    entry.suspected_at = dead_at
            if record.key > old.key:
                entry.last_changed = max(entry.last_changed, now)
            if record.neighbours != old.neighbours:
                self._relink(node_id)
            if (record.status == ALIVE_ST) != (old.status == ALIVE_ST):
                self._restand(node_id)  # it starts or stops relaying reachability
            if record.status != old.status or record.neighbours != old.neighbours:
                self._reach_dirty = True
            self._reevaluate(entry, now)
            changed.add(node_id)
            if record.status != old.status or _news(record, old):
                if self._gossipable(entry):
                    self._enqueue(node_id)
                if entry.state in _LIVE:
                    self._set_row(entry)
            if entry.state in _LIVE:
                self._live[bisect.bisect_left(self._live_ids, node_id)] = entry.record

    def _gossipable(self, entry: _Entry) -> bool:
        # R11/R12: a live member, or a suspicion or death notice; not a member that only
        # our own reachability holds DEAD (its record still reads as life).
        state = entry.state
        return state in _LIVE or (state is PeerState.DEAD and entry.record.status != ALIVE_ST)

    def _reevaluate(self, entry: _Entry, now: float) -> None:
        # R11: the verdict from the suspicion timer, and a heap item due exactly at the next change.
        self._set_state(entry, self._state_of(entry, now))
        self._bury(entry, now)
        due = self._transition_after(entry, now)
        if due != entry.due:
            entry.due = due
            if due != math.inf:
                heapq.heappush(self._heap, (due, entry.record.node_id))

    def suspect(self, node_id: str, now: float) -> bool:
        """SWIM detector (R11): a probe of ``node_id`` failed (our direct exchanges with
        it failed in a row); suspect it and spread the suspicion.

        It becomes SUSPECT here, DEAD ``suspicion_timeout`` later unless it refutes (a
        record of a higher incarnation). Returns whether a new suspicion began (False
        for the heartbeat detector, an unknown peer, or one already suspected or dead).
        """
        if not self._swim:
            return False
        self._advance(now)
        entry = self._peers.get(node_id)
        if entry is None or entry.state is None or entry.record.status != ALIVE_ST:
            return False
        entry.record = entry.record._evolve(status=SUSPECT_ST)
        entry.suspected_at = now
        self._restand(node_id)  # R12: a suspected node relays no reachability
        self._reevaluate(entry, now)
        if entry.state in _LIVE:
            self._live[bisect.bisect_left(self._live_ids, node_id)] = entry.record
        self._enqueue(node_id)
        return True

    def _refresh(self, record: MemberRecord) -> None:
        # R9: a heartbeat advance to pass on `refresh_sends` times. Nodes that may lead
        # (eligible, or claiming) go first: the election reads their liveness, and a
        # refresh budget too small for the whole view must not let a leader look DEAD.
        if record.uplink_score >= self.threshold or record.leader == record.node_id:
            self._fresh_first[record.node_id] = self.refresh_sends
        else:
            self._fresh[record.node_id] = self.refresh_sends

    def _enqueue(self, node_id: str) -> None:
        # R9: a newer update about a node replaces the queued one (memberlist's
        # invalidation): its count starts again and it is the newest.
        self._seq += 1
        self._queue[node_id] = [0, self._seq]
        self._fresh.pop(node_id, None)
        self._fresh_first.pop(node_id, None)
        # The queue's order lives in a heap of (times sent, -sequence, id), like
        # memberlist's btree; replaced or dropped updates leave stale items behind,
        # skipped when popped, and the heap is rebuilt when they pile up.
        if len(self._qheap) > 2 * len(self._queue) + 64:
            self._qheap = [(c, -q, n) for n, (c, q) in self._queue.items()]
            heapq.heapify(self._qheap)
        else:
            heapq.heappush(self._qheap, (0, -self._seq, node_id))

    def _refute(self, record: MemberRecord) -> bool:
        # R5: someone holds a record of us that is at least as new as ours but not ours.
        own = self._self
        if record == own or record.incarnation < own.incarnation:
            return False
        if record.status == ALIVE_ST and record.key < own.key:
            return False  # an older copy of us; a suspicion or death notice at our incarnation is refuted (R11)
        incarnation = min(record.incarnation + 1, MAX_COUNTER)
        heartbeat = 0 if incarnation > record.incarnation else min(record.heartbeat + 1, MAX_COUNTER)
        self._set_self(own._evolve(incarnation=incarnation, heartbeat=heartbeat))
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
        entry = self._peers.get(peer)
        entries = [entry] if entry is not None else [e for e in self._peers.values() if e.record.address == peer]
        refreshed = False
        if self._swim:
            # R11: a direct answer is not a refutation (only the node's new incarnation
            # is), but the node must hear what we believe so that it refutes: queue our
            # suspicion or death notice again. A tombstone goes, so its records count again.
            for entry in entries:
                node_id = entry.record.node_id
                if entry.state is None:
                    self._drop(node_id)
                    continue
                entry.last_direct = max(entry.last_direct, now)
                if entry.record.status != ALIVE_ST and node_id not in self._queue:
                    self._enqueue(node_id)
                refreshed = True
            return refreshed
        for entry in entries:
            if entry.state is not None:
                if now > entry.last_direct:
                    entry.last_direct = now
                    if entry.state is not PeerState.ALIVE:
                        self._seen(entry, now)
                refreshed = True
        return refreshed

    # -- verdicts ----------------------------------------------------------------

    def _state_of(self, entry: _Entry, now: float) -> PeerState | None:
        if self._swim:
            # R11: ALIVE until suspected; then SUSPECT, DEAD, forgotten on the suspicion's clock.
            # R12: the same clock runs from when no path reached it; the worse verdict holds.
            # Each bound is written as `_transition_after` computes it (a sum, in the same
            # order), never as an age: `now - since >= T` and `since + T <= now` disagree by
            # a rounding for some floats, and the cached verdict would then miss its change.
            rank = 0
            for since in (entry.suspected_at, entry.unreachable_since):
                if since is not None:
                    dead_at = since + self.suspicion_timeout
                    if now >= dead_at + self.forget_after:
                        return None
                    rank = max(rank, 2 if now >= dead_at else 1)
            return _BY_RANK[rank]
        seen = entry.last_seen
        if now < seen + self.suspect_after:
            return PeerState.ALIVE
        if now < seen + self.dead_after:
            return PeerState.SUSPECT
        if now < seen + self.dead_after + self.forget_after:
            return PeerState.DEAD
        return None

    def _transition_after(self, entry: _Entry, now: float) -> float:
        # The first time after `now` at which this entry's verdict changes (or it is dropped).
        if self._swim:
            due = math.inf
            if entry.suspected_at is not None:
                start = entry.suspected_at + self.suspicion_timeout
                for t in (start, start + self.forget_after, start + 2 * self.forget_after):
                    if t > now:
                        due = t
                        break
            if entry.unreachable_since is not None:
                # R12: no tombstone for what only our reachability buried: dropped at once.
                start = entry.unreachable_since + self.suspicion_timeout
                for t in (start, start + self.forget_after):
                    if now < t < due:
                        due = t
                        break
            return due
        seen = entry.last_seen
        forget = seen + self.dead_after + self.forget_after
        for t in (seen + self.suspect_after, seen + self.dead_after, forget, forget + self.forget_after):
            if t > now:
                return t
        return math.inf

    def _advance(self, now: float) -> None:
        """The one evaluate step before every input and verdict (R10): bring every verdict to ``now``.

        Invariants after it returns (the caches are never rebuilt, only kept):

        1. every entry's ``state`` is ``_state_of(entry, now)``, for the latest ``now`` seen;
        2. entries whose tombstone ran out are gone (from ``_peers``, ``_ids``);
        3. ``_live``/``_live_ids`` hold the ALIVE and SUSPECT peers' records, sorted by id;
        4. every entry has a heap item due at ``entry.due``, at or before its next
           verdict change; ``_digest_sum`` is the sum of the entries' ``row``, and
           every entry whose row no longer matches is in ``_rows_stale``;
        5. ``_version`` has moved since any verdict or election input changed.
        """
        if self._now is not None and now <= self._now:
            return
        self._now = now
        heap = self._heap
        peers = self._peers
        while heap and heap[0][0] <= now:
            due, node_id = heapq.heappop(heap)
            entry = peers.get(node_id)
            if entry is None or entry.due != due:
                continue  # superseded by an earlier item (the entry came back)
            self._set_state(entry, self._state_of(entry, now))
            if self._swim:
                self._bury(entry, now)
            nxt = self._transition_after(entry, now)
            if nxt == math.inf:
                self._drop(node_id)
            else:
                entry.due = nxt
                heapq.heappush(heap, (nxt, node_id))

    def _settle(self, now: float) -> None:
        """``_advance``, after bringing reachability up to date (R12) as of the last input."""
        if self._reach_dirty and self._now is not None:
            self._reach(self._now)
        self._advance(now)

    def _reach(self, now: float) -> None:
        """R12: which members a path of reported links reaches from us; start or stop their clocks.

        A link between two peers counts when each one's record lists the other (a record
        that has not heard of a link's loss, the far end's across a cut, cannot keep it);
        our own links are our neighbour table. Paths run through members whose own
        record stands (a suspected or dead member relays nothing). Run only after a link,
        a status or the member set has changed (R10).

        Incremental: the counted links (``_adj``) are kept as records change, and the
        reached peers form a tree (``_parent``): each was reached through its parent, a
        reached peer that relays, over a counted link, or is a direct neighbour. What can
        shrink the reached set cuts the tree: a link, a direct neighbour or a member that
        goes, a member that stops relaying (``_orphans``); those peers and everything that
        hangs from them leave the tree, and each one that a reached, relaying peer still
        links to, or that is a direct neighbour, is re-attached and spreads again. What can
        grow it (a new link, member, direct neighbour or relay, ``_attach``) is tried the same
        way. The cost is the part of the tree that moved, not the whole mesh (a change at
        1,000 members cost 4.6 ms in full, bench/membership.py). The answer is the full
        recomputation's (``_reachable``; tests/test_membership_reach.py compares them over
        random changes). Two ids with the same 8-byte hash (only a forger would make them)
        make the links ambiguous: from then on this node recomputes in full.
        """
        self._reach_dirty = False
        direct = self._direct
        if direct is None or self._full_reach:
            self._orphans.clear()
            self._attach.clear()
            if direct is not None:
                self._set_reached(self._reachable(), list(self._peers), now)
            return
        orphans, attach = self._orphans, self._attach
        self._orphans, self._attach = set(), set()
        peers, adj, parent, children = self._peers, self._adj, self._parent, self._children
        # 1. Cut: the orphans and every peer below them leave the tree.
        moved = attach
        stack = [x for x in orphans if x in parent]
        while stack:
            x = stack.pop()
            up = parent.pop(x, None)
            if up is None:
                continue  # listed twice (an orphan below another)
            if up:
                kids = children.get(up)
                if kids:
                    kids.discard(x)
            moved.add(x)
            below = children.pop(x, None)
            if below:
                stack.extend(below)
        # 2. Re-attach what a direct link or a reached, relaying peer still reaches.
        queue: list[str] = []
        for x in moved:
            if x in parent:
                continue
            entry = peers.get(x)
            if entry is None or entry.state is None:
                continue
            if x in direct:
                parent[x] = ""
                queue.append(x)
                continue
            for w in adj[x]:
                if w in parent and peers[w].record.status == ALIVE_ST:
                    parent[x] = w
                    children.setdefault(w, set()).add(x)
                    queue.append(x)
                    break
        # 3. Spread from every peer attached in 2.
        grown: list[str] = []
        while queue:
            u = queue.pop()
            if peers[u].record.status != ALIVE_ST:
                continue
            for v in adj[u]:
                if v not in parent and peers[v].state is not None:
                    parent[v] = u
                    children.setdefault(u, set()).add(v)
                    queue.append(v)
                    grown.append(v)
        # 4. Verdicts of the peers whose standing may have changed.
        for x in itertools.chain(moved, grown):
            entry = peers.get(x)
            if entry is not None:
                self._mark_reached(entry, x in parent, now)

    def _reachable(self) -> set[str]:
        """R12 in full, for reference (tests) and for the ambiguous case: the members a
        path of counted links reaches from us, walked from scratch over the records."""
        direct = self._direct or frozenset()
        peers, by_hash = self._peers, self._by_hash
        reached: set[str] = set()
        stack: list[_Entry] = []
        for node_id in direct:
            entry = peers.get(node_id)
            if entry is not None and entry.state is not None:
                reached.add(node_id)
                stack.append(entry)
        while stack:
            record = stack.pop().record
            if record.status != ALIVE_ST:
                continue
            mine = neighbour_hash(record.node_id)
            for h in record.neighbour_set():
                other = by_hash.get(h)
                if other is None or other in reached:
                    continue
                entry = peers[other]
                if entry.state is not None and mine in entry.record.neighbour_set():
                    reached.add(other)
                    stack.append(entry)
        return reached

    def _set_reached(self, reached: set[str], among: Iterable[str], now: float) -> None:
        peers = self._peers
        for node_id in among:
            self._mark_reached(peers[node_id], node_id in reached, now)

    def _mark_reached(self, entry: _Entry, reached: bool, now: float) -> None:
        """R12: a path reaches the member again (its clock stops), or none does since `now`."""
        if reached:
            if entry.unreachable_since is not None:
                entry.unreachable_since = None
                self._reevaluate(entry, now)
        elif entry.unreachable_since is None and entry.state is not None:
            entry.unreachable_since = now
            self._reevaluate(entry, now)

    def _relink(self, node_id: str) -> None:
        # R12: the peer's record (new, or with other neighbours): its counted links now.
        by_hash, adj, lists = self._by_hash, self._adj, self._lists
        mine = neighbour_hash(node_id)
        listed = lists[node_id] = self._peers[node_id].record.neighbour_set()
        now_linked = set()
        for h in listed:
            other = by_hash.get(h)
            if other is not None and other != node_id and mine in lists[other]:
                now_linked.add(other)
        was = adj[node_id]
        for other in was - now_linked:
            adj[other].discard(node_id)
            self._cut(node_id, other)
        for other in now_linked - was:
            adj[other].add(node_id)
            self._attach.add(other)
            self._attach.add(node_id)
        adj[node_id] = now_linked

    def _cut(self, a: str, b: str) -> None:
        # R12: the link a-b is gone; if the tree used it, what hangs from it must find another way.
        parent = self._parent
        if parent.get(b) == a:
            self._orphans.add(b)
        elif parent.get(a) == b:
            self._orphans.add(a)
        self._reach_dirty = True

    def _restand(self, node_id: str) -> None:
        # R12: the member started or stopped relaying, or being reachable at all.
        self._orphans.add(node_id)
        self._attach.add(node_id)
        self._reach_dirty = True

    def _seen(self, entry: _Entry, now: float) -> None:
        # The entry was just seen (first record, newer record, direct exchange): ALIVE,
        # and its heap item must be due no later than its new suspicion time.
        self._set_state(entry, PeerState.ALIVE)
        due = entry.last_seen + self.suspect_after
        if due < entry.due:
            entry.due = due
            heapq.heappush(self._heap, (due, entry.record.node_id))

    def _set_state(self, entry: _Entry, state: PeerState | None) -> None:
        old = entry.state
        if state is old:
            return
        entry.state = state
        self._version += 1
        node_id = entry.record.node_id
        if self._swim and (old is None) != (state is None):
            self._restand(node_id)  # R12: a forgotten member is reached by nothing
        was_live, is_live = old in _LIVE, state in _LIVE
        if was_live and not is_live:
            pos = bisect.bisect_left(self._live_ids, node_id)
            del self._live_ids[pos]
            del self._live[pos]
            if not self._swim:  # R4: the dead are not gossiped (R11: their death notices are)
                self._queue.pop(node_id, None)
            self._fresh.pop(node_id, None)
            self._fresh_first.pop(node_id, None)
        elif is_live and not was_live:
            pos = bisect.bisect_left(self._live_ids, node_id)
            self._live_ids.insert(pos, node_id)
            self._live.insert(pos, entry.record)
        if was_live != is_live:
            self._set_row(entry)  # ALIVE <-> SUSPECT leaves the digest as it is (R9)
        if self._swim and not self._gossipable(entry):
            self._queue.pop(node_id, None)  # forgotten, or DEAD by our reachability alone (R12)

    def _bury(self, entry: _Entry, now: float) -> None:
        # R11: once a suspicion has run its time the record becomes a death notice, what we
        # tell others now (unreachability alone makes none, R12: it is our own inference).
        since = entry.suspected_at
        if since is not None and entry.record.status != DEAD_ST and now >= since + self.suspicion_timeout:
            entry.record = entry.record._evolve(status=DEAD_ST)

    def _set_row(self, entry: _Entry) -> None:
        # The digest is a sum of one hash per live member, so one member's change
        # costs one hash, not a pass over the view (R10).
        # Lazily: a peer that flips live/DEAD many times between two digests is hashed once.
        self._rows_stale.add(entry.record.node_id)
        self._version += 1

    def _drop(self, node_id: str) -> None:
        entry = self._peers.pop(node_id)
        if self._by_hash.get(neighbour_hash(node_id)) == node_id:
            del self._by_hash[neighbour_hash(node_id)]
        if self._swim:
            self._lists.pop(node_id, None)
            for other in self._adj.pop(node_id, ()):
                self._adj[other].discard(node_id)
                self._cut(node_id, other)
            self._restand(node_id)
        self._digest_sum = (self._digest_sum - entry.row) % _DIGEST_MOD
        self._rows_stale.discard(node_id)
        del self._ids[bisect.bisect_left(self._ids, node_id)]

    def state(self, node_id: str, now: float) -> PeerState:
        """The failure detector's verdict on ``node_id`` at ``now`` (R3).

        Ourselves are ALIVE; an unknown or forgotten node is DEAD (there is no
        evidence that it is alive).
        """
        if node_id == self._self.node_id:
            return PeerState.ALIVE
        if self._reach_dirty and self._now is not None and now >= self._now:
            self._settle(now)
        entry = self._peers.get(node_id)
        if entry is None:
            return PeerState.DEAD
        return self._state_of(entry, now) or PeerState.DEAD

    def view(self, now: float) -> list[MemberView]:
        """Every member we show (ourselves, ALIVE, SUSPECT, DEAD), sorted by node id.

        ``age`` is seconds since the member was last seen (0 for ourselves).
        """
        if self._now is not None and now < self._now:
            return self._view_at(now)  # a question about the past: answer it exactly, uncached
        self._settle(now)
        peers = self._peers
        make = MemberView._make
        rows = []
        for node_id in self._ids:
            entry = peers[node_id]
            state = entry.state
            if state is not None:
                seen = entry.last_changed if entry.last_changed > entry.last_direct else entry.last_direct  # noqa: FURB136 (hot loop: no call)
                rows.append(make((entry.record, state, now - seen if now > seen else 0.0)))
        own = self._self
        pos = bisect.bisect_left(rows, own.node_id, key=lambda row: row.record.node_id)
        rows.insert(pos, MemberView(own, PeerState.ALIVE, 0.0))
        return rows

    def _view_at(self, now: float) -> list[MemberView]:
        rows = [MemberView(self._self, PeerState.ALIVE, 0.0)]
        for entry in self._peers.values():
            state = self._state_of(entry, now)
            if state is not None:
                rows.append(MemberView(entry.record, state, max(0.0, now - entry.last_seen)))
        rows.sort(key=lambda row: row.record.node_id)
        return rows

    def live_peers(self, now: float) -> list[MemberRecord]:
        """ALIVE and SUSPECT peers, ourselves excluded, sorted by node id."""
        if self._now is not None and now < self._now:
            return [r.record for r in self._view_at(now) if r.record is not self._self and r.state in _LIVE]
        self._settle(now)
        return list(self._live)

    def records_for_gossip(self, now: float | None = None) -> list[MemberRecord]:
        """The full list, for a peer whose ``digest`` differs: ourselves and ALIVE or SUSPECT peers (R4).

        Sorted by node id. Args:
            now: the time of the round; by default the latest time this view was
                given (the node's 1 s tick keeps it current).
        """
        if now is None:
            now = self._now
        if now is None:
            return [self._self]
        if self._swim:
            # R11: death notices too (within `forget_after`), so a peer that missed one learns it;
            # not the records of members only our reachability holds DEAD (R12).
            return [r.record for r in self.view(now) if r.state is not PeerState.DEAD or r.record.status != ALIVE_ST]
        if self._now is not None and now < self._now:
            return [r.record for r in self._view_at(now) if r.state in _LIVE]
        self._advance(now)
        pos = bisect.bisect_left(self._live_ids, self._self.node_id)
        return [*self._live[:pos], self._self, *self._live[pos:]]

    def piggyback(self, now: float, limit: int, *, repair: bool = False) -> tuple[MemberRecord, ...]:
        """Records to attach to any outgoing message, at most ``limit`` (R9).

        First our own record (its heartbeat current), then queued updates (a new
        member, a changed incarnation, score, leader or address, a peer back from
        forgotten), least sent first and newest first among equals, each
        counted and dropped after ``retransmit_limit`` sends; then, with room
        left, heartbeat refreshes: peers whose heartbeat advanced since we last
        passed their record on, those that may lead (eligible or claiming) first,
        then longest waiting first, each passed on once per advance. The refreshes are what keeps a gossip-style failure detector
        alive beyond direct neighbours; the queue is what makes a change reach
        everyone in O(log N) rounds.

        Raises:
            ValueError: ``limit`` is below 1.
        """
        if type(limit) is not int or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        if not self._swim and self.heartbeat_period is not None and now >= self._beat_at + self.heartbeat_period:
            self.tick(now)  # a lazy heartbeat: raised when it is sent, not on a timer (R6)
        self._settle(now)
        out = [self._self]
        if limit == 1:
            return tuple(out)
        peers = self._peers
        if self._queue:
            cap = retransmit_limit(self.retransmit_mult, len(self._live) + 1)
            queue, qheap = self._queue, self._qheap
            again = []
            while qheap and len(out) < limit:
                count, neg_seq, node_id = heapq.heappop(qheap)
                slot = queue.get(node_id)
                if slot is None or slot[0] != count or slot[1] != -neg_seq:
                    continue  # replaced by a newer update, or gone
                out.append(peers[node_id].record)
                slot[0] += 1
                if slot[0] >= cap:
                    del queue[node_id]
                else:
                    again.append((slot[0], neg_seq, node_id))
                self._fresh.pop(node_id, None)
                self._fresh_first.pop(node_id, None)
            for item in again:
                heapq.heappush(qheap, item)
        for fresh in (self._fresh_first, self._fresh):
            if len(out) < limit and fresh:
                taken = list(itertools.islice(fresh, limit - len(out)))
                for node_id in taken:
                    left = fresh.pop(node_id) - 1
                    if left > 0:
                        fresh[node_id] = left  # again, after those waiting longer
                    out.append(peers[node_id].record)
        if repair and self._swim and len(out) < limit:
            self._fill(out, limit)
        return tuple(out)

    def _fill(self, out: list[MemberRecord], limit: int) -> None:
        # R11: a peer whose digest differs gets, after the news, the next slice of our
        # view (death notices included), going round the sorted ids from where the
        # last slice ended: what a retransmit limit lost is repaired a slice at a time.
        ids, peers = self._ids, self._peers
        if not ids:
            return
        sent = {r.node_id for r in out}
        start = bisect.bisect_right(ids, self._cursor)
        for i in range(len(ids)):
            node_id = ids[(start + i) % len(ids)]
            entry = peers[node_id]
            if node_id in sent or not self._gossipable(entry):
                continue
            out.append(entry.record)
            self._cursor = node_id
            if len(out) >= limit:
                return

    def pending_updates(self) -> int:
        """How many updates wait in the retransmit queue (for status pages and tests)."""
        return len(self._queue)

    def digest(self, now: float) -> bytes:
        """A 12-byte summary of what the election and membership read (R9).

        Over ourselves and every ALIVE or SUSPECT peer, one BLAKE2b row per member,
        ``(node_id, incarnation, claims to lead, eligible, score // bucket_size)``,
        summed (so a change costs one row) and hashed once more. Heartbeats and the
        ALIVE/SUSPECT distinction are left out (both are live), so two idle peers
        with the same live members and claims have the same digest and need
        exchange nothing more; when digests differ, a larger piggyback settles it.
        """
        self._settle(now)
        total = self._digest_sum
        for node_id in self._rows_stale:
            entry = self._peers[node_id]
            row = _digest_row(entry.record, self.threshold, self.bucket_size) if entry.state in _LIVE else 0
            total += row - entry.row
            entry.row = row
        self._rows_stale.clear()
        self._digest_sum = total % _DIGEST_MOD
        own = _digest_row(self._self, self.threshold, self.bucket_size)
        total = (self._digest_sum + own) % _DIGEST_MOD
        return hashlib.blake2b(total.to_bytes(16, "big"), digest_size=DIGEST_SIZE).digest()

    def next_deadline(self) -> float | None:
        """The earliest time after the latest ``now`` seen at which some peer's verdict changes.

        A thin trio task can sleep until then (or its next tick, if sooner) and
        re-run the election; None when there are no peers. Exact; O(log N) per
        peer whose deadline a heartbeat has moved since it was filed.
        """
        if self._now is None:
            return None
        now = self._now
        if self._reach_dirty:
            self._reach(now)
        heap = self._heap
        while heap:
            due, node_id = heap[0]
            entry = self._peers.get(node_id)
            if entry is None or entry.due != due:
                heapq.heappop(heap)  # superseded
                continue
            exact = self._transition_after(entry, now)
            if exact == due:
                return due
            entry.due = exact  # a heartbeat moved it later: re-file it, exactly
            heapq.heapreplace(heap, (exact, node_id))
        return None

    def leader(
        self,
        now: float,
        current: str | None = None,
        *,
        threshold: int | None = None,
        bucket_size: int | None = None,
    ) -> str | None:
        """Whom to follow: ``choose_leader`` over ourselves and the live peers (R7, R8).

        Claims (a record whose ``leader`` names itself) decide: the best live,
        eligible claimant by ``(score // bucket_size, node_id)`` is the incumbent,
        and it keeps the role unless a non-claimant is a whole bucket better.
        Without a claimant the best eligible node wins. ``current`` (the caller's
        memory) is accepted for compatibility and not used: a memory that differs
        between nodes is what kept two groups on two leaders (R8). Publish the
        result with ``set_leader`` so peers see the claim.
        """
        threshold = self.threshold if threshold is None else threshold
        bucket_size = self.bucket_size if bucket_size is None else bucket_size
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        self._settle(now)
        own = self._self
        key = (self._version, own.uplink_score, own.leader, threshold, bucket_size)
        if self._leader_cache is not None and self._leader_cache[0] == key:
            return self._leader_cache[1]
        # Only eligible members can lead or hold a claim that counts (R7): the others are
        # left out before `choose_leader` builds and checks its tuples (most of a large
        # mesh's members are chargers without an uplink; 0.6 ms at 1,000 members otherwise).
        result = choose_leader(
            (
                (r.node_id, r.uplink_score, r.leader == r.node_id)
                for r in (own, *self._live)
                if r.uplink_score >= threshold
            ),
            threshold=threshold,
            bucket_size=bucket_size,
        )
        self._leader_cache = (key, result)
        return result


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


def choose_leader(
    candidates: Iterable[tuple[str, int, bool]],
    *,
    threshold: int = DEFAULT_THRESHOLD,
    bucket_size: int = DEFAULT_BUCKET_SIZE,
) -> str | None:
    """The leader for a set of live nodes and their published claims, deterministically (R7, R8).

    Args:
        candidates: ``(node_id, uplink_score, claims)`` of every live node, ourselves
            included; ``claims`` is whether the node's record names itself leader. A
            node listed twice counts with its higher score and any claim.
        threshold: lowest score that may lead.
        bucket_size: width of a score class; also the margin by which a
            non-claimant must beat the incumbent claimant.

    Returns:
        The best eligible claimant by ``(score // bucket_size, node_id)``, unless an
        eligible node scores at least ``bucket_size`` above it (then the best such
        node); with no eligible claimant, the best eligible node; None when no
        candidate passes the threshold. A function of the set alone: nodes that see
        the same records choose the same leader, whatever they chose before.

    Raises:
        ValueError: a score is outside 0-100, or ``bucket_size`` is below 1.
    """
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    scores: dict[str, int] = {}
    claims: set[str] = set()
    for node_id, score, claim in candidates:
        if type(node_id) is not str:
            raise ValueError(f"node ids must be strings, got {type(node_id).__name__}")
        if type(score) is not int or not 0 <= score <= 100:
            raise ValueError(f"uplink score of {node_id!r} must be an int in 0-100, got {score!r}")
        if score > scores.get(node_id, -1):
            scores[node_id] = score
        if claim:
            claims.add(node_id)
    eligible = {nid: s for nid, s in scores.items() if s >= threshold}
    if not eligible:
        return None

    def rank(nid: str) -> tuple[int, str]:
        return (eligible[nid] // bucket_size, nid)

    claimants = [nid for nid in eligible if nid in claims]
    if not claimants:
        return max(eligible, key=rank)
    incumbent = max(claimants, key=rank)
    better = [nid for nid, s in eligible.items() if s >= eligible[incumbent] + bucket_size]
    return max(better, key=rank) if better else incumbent
