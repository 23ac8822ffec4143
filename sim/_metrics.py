"""What a run measures (docs/sim.md explains every figure).

- **Convergence.** Every acknowledged local operation (a session's start, a
  meter reading, a stop) is one *change*. Its convergence time is the virtual
  time from the acknowledgement until every node that is running holds it. A
  node that is down does not count (it must catch up once it runs again, and
  the change counts as converged only when every running node holds it); a node
  that archived the session after its receipt counts as holding it. For each
  change the first moment each node holds it is also kept, so delays can be
  grouped by hop distance from the node that made the change.
- **Receipts.** The time from a session's stop (acknowledged on its charger) to
  the cloud's receipt appearing in the charger's own copy of the document.
- **Exactly once** (computed at the end from the cloud's ledger and the nodes):
  `events_lost` (acknowledged events that are neither accepted by the cloud nor
  held by any running node), `events_not_in_cloud` (acknowledged events the
  cloud has not accepted), `sessions_billed_twice` (sessions with more than one
  ledger row, or more than one distinct receipt seen in the ledger or any node's
  copy at any time).

- **Leadership** (``LeaderBeliefs``): at every sample, what each running node
  believes (its own ``leader``). ``changes`` counts every change of a node's
  believed leader between two samples while it runs (the first choice of a
  node that had none is not a change, nor is a node's belief lost when it
  stops); ``distinct`` is the number of different leaders believed at that
  sample, ``split_samples`` the samples where it was above one, and
  ``longest_split`` the longest run of such samples, in seconds.

Nothing here reads a clock: times come in as arguments (virtual seconds).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from automerge.core import ROOT, ScalarType

from meshnode import PeerState

MEMBERSHIP_OBSERVERS = 32
"""At most this many running nodes report their membership view at one sample (see
`Metrics.sample_membership`)."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), or None for no values."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def rounded(value: float | None, digits: int = 6) -> float | None:
    if value is None:
        return None
    out = round(value, digits)
    return 0.0 if out == 0 else out  # no "-0.0"


def holds(node: Any, doc_id: str, event_id: str) -> bool:
    """Whether a node's replica holds the change that added `event_id` to session `doc_id`."""
    doc = node.replica.docs.get(doc_id)
    if doc is None:
        return doc_id in node.archived
    events = doc.get(ROOT, "events")
    if events is None:
        return False
    return doc.get(events[1], event_id) is not None


def receipt_of(node: Any, doc_id: str) -> bytes | None:
    doc = node.replica.docs.get(doc_id)
    if doc is None:
        return None
    got = doc.get(ROOT, "receipt")
    if got is None or not isinstance(got[0], tuple) or got[0][0] != ScalarType.Bytes:
        return None  # no receipt yet (the key holds null until the cloud sets it)
    return bytes(got[0][1])


@dataclass
class Change:
    index: int
    doc_id: str
    event_id: str
    origin: str
    kind: str
    t0: float
    missing: set[str]
    converged_at: float | None = None
    first_held: dict[str, float] = field(default_factory=dict)


@dataclass
class SessionRecord:
    session_id: str
    origin: str
    started: float
    events: list[str] = field(default_factory=list)
    stopped_at: float | None = None
    receipt_at: float | None = None


class LeaderBeliefs:
    """Whom each running node follows, sample by sample, and how often that changed.

    A leader the nodes do not agree on is the failure to see: counting changes of
    a majority's leader reported 0 while the festival scenario's nodes were split
    between two leaders in 80 of 122 samples (issue 10, item 7).
    """

    def __init__(self) -> None:
        self.believed: dict[str, str] = {}
        """node id -> the last leader it followed (running nodes only)."""
        self.changes = 0
        self.changes_by_node: Counter[str] = Counter()
        self.samples = 0
        self.split_samples = 0
        self.distinct_max = 0
        self.longest_split = 0.0
        self._split_since: float | None = None

    def observe(self, beliefs: dict[str, str | None], now: float) -> int:
        """Record one sample: ``beliefs`` maps every running node to its leader (or None).

        Returns:
            The number of distinct leaders believed (None is not a leader).
        """
        last = {n: b for n, b in self.believed.items() if n in beliefs}  # a stopped node starts afresh
        for node_id, leader in sorted(beliefs.items()):
            if leader is None:
                continue  # no leader for now: its last one still stands for the comparison
            before = last.get(node_id)
            if before is not None and leader != before:
                self.changes += 1
                self.changes_by_node[node_id] += 1
            last[node_id] = leader
        self.believed = last
        distinct = len({b for b in beliefs.values() if b is not None})
        self.samples += 1
        self.distinct_max = max(self.distinct_max, distinct)
        if distinct > 1:
            self.split_samples += 1
            if self._split_since is None:
                self._split_since = now
            self.longest_split = max(self.longest_split, now - self._split_since)
        else:
            self._split_since = None
        return distinct

    def summary(self) -> dict[str, Any]:
        return {
            "leader_changes": self.changes,
            "leader_split_samples": self.split_samples,
            "leader_samples": self.samples,
            "leaders_at_once_max": self.distinct_max,
            "leader_longest_split_s": rounded(self.longest_split),
        }


class Metrics:
    """Bookkeeping of changes, sessions and receipts while a run goes on."""

    def __init__(self, hops: Callable[[str], dict[str, int]]) -> None:
        self._hops = hops
        self.running: dict[str, Any] = {}
        """node id -> the running Node."""
        self.changes: list[Change] = []
        self._pending: dict[str, list[Change]] = {}
        self.pending_count = 0
        self.sessions: dict[str, SessionRecord] = {}
        self.acked: dict[str, str] = {}
        """event id -> session id, for every acknowledged event."""
        self.receipts_seen: dict[str, set[bytes]] = {}
        self._awaiting_receipt: dict[str, SessionRecord] = {}
        self.counters: Counter[str] = Counter()
        self.leaders = LeaderBeliefs()

    # --- nodes ---------------------------------------------------------------------

    def node_up(self, node_id: str, node: Any, now: float) -> None:
        self.running[node_id] = node
        for doc_id, pending in sorted(self._pending.items()):
            for change in pending:
                if holds(node, doc_id, change.event_id):
                    change.first_held.setdefault(node_id, now)
                else:
                    change.missing.add(node_id)

    def node_down(self, node_id: str, now: float) -> None:
        self.running.pop(node_id, None)
        for doc_id in sorted(self._pending):
            for change in list(self._pending[doc_id]):
                change.missing.discard(node_id)
                self._check(change, now)

    # --- the workload --------------------------------------------------------------

    def session_started(self, session_id: str, origin: str, event_ids: Iterable[str], now: float) -> None:
        record = SessionRecord(session_id, origin, now)
        self.sessions[session_id] = record
        for event_id in event_ids:
            self._acked(record, event_id, "start", now)

    def event_recorded(self, session_id: str, event_id: str, kind: str, now: float) -> None:
        record = self.sessions[session_id]
        self._acked(record, event_id, kind, now)
        if kind == "stop":
            record.stopped_at = now
            self._awaiting_receipt[session_id] = record
            node = self.running.get(record.origin)
            if node is not None:
                self._look_for_receipt(record.origin, node, session_id, now)

    def _acked(self, record: SessionRecord, event_id: str, kind: str, now: float) -> None:
        record.events.append(event_id)
        self.acked[event_id] = record.session_id
        self.counters["events"] += 1
        change = Change(len(self.changes), record.session_id, event_id, record.origin, kind, now,
                        {n for n in self.running if n != record.origin})  # fmt: skip
        change.first_held[record.origin] = now
        self.changes.append(change)
        if not self._check(change, now):
            self._pending.setdefault(record.session_id, []).append(change)
            self.pending_count += 1

    # --- replication ---------------------------------------------------------------

    def on_change(self, node_id: str, node: Any, doc_id: str, now: float) -> None:
        """A node's document changed (the node's change listener)."""
        pending = self._pending.get(doc_id)
        if pending:
            for change in list(pending):
                if node_id not in change.first_held and holds(node, doc_id, change.event_id):
                    change.first_held[node_id] = now
                    change.missing.discard(node_id)
                    self._check(change, now)
        if doc_id in self._awaiting_receipt or doc_id in self.receipts_seen:
            self._look_for_receipt(node_id, node, doc_id, now)

    def _look_for_receipt(self, node_id: str, node: Any, doc_id: str, now: float) -> None:
        receipt = receipt_of(node, doc_id)
        if receipt is None:
            return
        self.receipts_seen.setdefault(doc_id, set()).add(receipt)
        record = self._awaiting_receipt.get(doc_id)
        if record is not None and record.origin == node_id:
            record.receipt_at = now
            del self._awaiting_receipt[doc_id]

    def _check(self, change: Change, now: float) -> bool:
        if change.converged_at is not None or change.missing:
            return change.converged_at is not None
        change.converged_at = now
        pending = self._pending.get(change.doc_id)
        if pending is not None and change in pending:
            pending.remove(change)
            self.pending_count -= 1
            if not pending:
                del self._pending[change.doc_id]
        return True

    # --- leadership -----------------------------------------------------------------

    def sample_leaders(self, now: float) -> int:
        """Feed what every running node believes to ``self.leaders``; the distinct leaders."""
        return self.leaders.observe({n: getattr(node, "leader", None) for n, node in self.running.items()}, now)

    def sample_membership(self, now: float, sample: int = 0) -> tuple[float, float]:
        """How well the failure detector keeps up: over the running nodes that observe at this
        sample, the share of the other running nodes each holds live (ALIVE or SUSPECT) and the
        share it holds ALIVE. A share below 1 is a false verdict (the peer runs): DEAD drops it
        from the election.

        Every running node observes while there are at most `MEMBERSHIP_OBSERVERS`; in a larger
        mesh that many do, a different slice of the sorted running nodes at each sample
        (``sample`` is the sample's number), so that a sample costs O(N), not O(N^2): the
        shares are then an estimate from those observers' views of every running peer.
        """
        running = set(self.running)
        others = len(running) - 1
        if others <= 0:
            return (1.0, 1.0)
        ids = sorted(self.running)
        if len(ids) > MEMBERSHIP_OBSERVERS:
            start = (sample * MEMBERSHIP_OBSERVERS) % len(ids)
            ids = (ids[start:] + ids[:start])[:MEMBERSHIP_OBSERVERS]
        live = alive = 0
        for node_id in ids:
            membership = getattr(self.running[node_id], "membership", None)
            if membership is None:
                continue
            for record in membership.live_peers(now):
                peer = record.node_id
                if peer in running and peer != node_id:
                    live += 1
                    if membership.state(peer, now) is PeerState.ALIVE:
                        alive += 1
        pairs = len(ids) * others
        return (live / pairs, alive / pairs)

    # --- results -------------------------------------------------------------------

    def awaiting_receipts(self) -> int:
        return len(self._awaiting_receipt)

    def convergence(self) -> dict[str, Any]:
        times = [c.converged_at - c.t0 for c in self.changes if c.converged_at is not None]
        return {
            "p50": rounded(percentile(times, 0.5)),
            "p95": rounded(percentile(times, 0.95)),
            "max": rounded(max(times) if times else None),
            "changes": len(self.changes),
            "not_converged": sum(1 for c in self.changes if c.converged_at is None),
        }

    def convergence_times(self) -> list[float]:
        return [c.converged_at - c.t0 for c in self.changes if c.converged_at is not None]

    def delay_by_hops(self) -> dict[str, dict[str, Any]]:
        """Per hop distance from the origin: how long until a node at that distance held a change."""
        by: dict[int, list[float]] = {}
        for change in self.changes:
            distances = self._hops(change.origin)
            for node_id, t in change.first_held.items():
                d = distances.get(node_id)
                if d is not None and d > 0:
                    by.setdefault(d, []).append(t - change.t0)
        return {
            str(d): {
                "p50": rounded(percentile(v, 0.5)),
                "p95": rounded(percentile(v, 0.95)),
                "max": rounded(max(v)),
                "count": len(v),
            }  # fmt: skip
            for d, v in sorted(by.items())
        }

    def receipt_latency(self) -> dict[str, Any]:
        times = [s.receipt_at - s.stopped_at for s in self.sessions.values()
                 if s.receipt_at is not None and s.stopped_at is not None]  # fmt: skip
        return {
            "p50": rounded(percentile(times, 0.5)),
            "p95": rounded(percentile(times, 0.95)),
            "max": rounded(max(times) if times else None),
            "count": len(times),
        }
