"""The replication engine's decisions, sans-IO: whom to push what, when to check, whom to greet.

The trio layer (`meshnode.Node`) feeds every input here with the time it read
once at the edge, then calls `poll(now)` and carries out the actions it returns
(`meshnode.core.messages`), and sleeps until `next_deadline()` or the next input.
Nothing here opens a socket, calls trio or reads a clock (STYLE rules 1, 2, 4).

How a change travels (docs/protocol.md, protocol version 3)
-----------------------------------------------------------

- A change, local or received, marks the document *pending* for every verified
  neighbour that may lack it: not the peer it came from, not the peers that one
  told us it pushes to itself (they get it from the source), not a peer whose
  known heads already equal ours.
- The node has one push bucket (a token bucket of `push_burst` flushes that
  refills one flush per `push_interval`): a flush sends, in the same instant, a
  push to every neighbour with something pending, and goes at once while the
  bucket holds a token, else when the next token arrives. A quiet node adds no
  delay, not even to a change made just after another one (with a bucket of
  one, a plain slot, such a change waited for it); under load the bucket stays
  empty, so a link carries one push per interval, changes batch and traffic
  stays bounded as with a slot. The bucket absorbs bursts, not a rate: a node
  that writes more than one change per `push_interval` for a while still waits
  (bench/mesh.py --sim, 10 nodes, one event at a time from a random node every
  ~80 ms: p95 0.37 s with a slot, 0.31 s with two flushes). A push is one-way (no
  response): the changes the peer lacks, computed from the heads we believe it
  holds.
- A neighbour verified just now (new, or restarted) gets what changed lately in
  a catch-up push at once, outside the bucket: it is a push target from its first
  hello, and a node that boots into a busy mesh does not wait for the bucket
  (glomers: a node booting last held the first changes 0.4 s after its hellos,
  slot included; every change that took over 0.6 s was such a catch-up).
- Anti-entropy: every `exchange_interval` one neighbour (the one we checked
  longest ago) gets an exchange: one small heads-hash and membership digest;
  only when they differ does the I/O layer go on to the digest and Automerge
  sync. A lost push, a restart, a node that was away: all repaired here. A new
  neighbour gets an exchange at once.
- Gap repair: a push whose changes build on changes we lack (an earlier push
  from that peer was lost) leaves a gap; anti-entropy leaves a busy document to
  the pushes, and with many neighbours the next exchange with that very peer is
  far off, so the document is synced with that peer instead (`SyncDocs`) once
  `gap_wait` has passed without the gap closing (pushes of different sizes may
  overtake each other), at most one such sync per peer at a time.

Invariants (checked by tests/test_core_replicator.py)
----------------------------------------------------

1. No action names a peer that is not in the neighbour table (verified hello).
2. Pushes to a neighbour, besides one catch-up push when it is freshly verified,
   follow the bucket: in any span of `L` seconds at most `push_burst + L /
   push_interval` of them (`push_burst` at once, then one per `push_interval`);
   at most one exchange per neighbour at a time; none while it is backed off.
3. A document is never pending for the peer it came from, nor for a peer whose
   known heads equal our heads.
4. `next_deadline()` is the earliest time at which `poll` would return something
   without a new input (or None), so a caller that sleeps until then misses nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .messages import Action, SendHello, SendPush, StartExchange, SyncDocs, Tick
from .neighbours import Hellos, Neighbour, NeighbourTable, unit


class Replicator:
    """Decides pushes, anti-entropy exchanges, hellos and housekeeping ticks.

    Args:
        node_id: our id (never a peer).
        push_interval: the push bucket refills one flush per this many seconds
            (under load: the least time between two pushes to one peer, batching).
        push_burst: flushes the push bucket holds when full (1: a plain slot).
        exchange_interval: time between two anti-entropy exchanges (with one peer each).
        tick_interval: housekeeping period (membership heartbeat, election).
        ttl: a neighbour not heard from for this long is forgotten.
        salt: makes backoff jitter differ between nodes, reproducibly.
    """

    def __init__(
        self,
        node_id: str,
        *,
        push_interval: float = 0.4,
        push_burst: int = 2,
        exchange_interval: float = 1.0,
        tick_interval: float = 1.0,
        ttl: float = 60.0,
        salt: str = "",
        settle: float = 1.0,
        recent: float = 30.0,
        gap_wait: float = 0.2,
    ) -> None:
        if push_burst < 1 or not push_interval > 0:
            raise ValueError(f"push_burst must be >= 1 and push_interval > 0, got {push_burst}, {push_interval}")
        self.node_id = node_id
        self.push_interval = push_interval
        self.push_burst = push_burst
        self.exchange_interval = exchange_interval
        self.tick_interval = tick_interval
        self.salt = salt
        self._draws = 0
        self.table = NeighbourTable(ttl=ttl, salt=salt)
        self.hellos = Hellos()
        self.heads: dict[str, tuple[bytes, ...]] = {}
        """Our heads per document (what pushes compare with)."""
        self.changed_at: dict[str, float] = {}
        """When each document last changed here (local or received)."""
        self.settle = settle
        self.recent = recent
        self._next_exchange = -math.inf
        self._next_tick = -math.inf
        self._push_tat = -math.inf
        """The push bucket in its GCRA form (ITU-T I.371; same decisions as a token
        bucket, one number instead of a count and a time): when the bucket would be
        full again. A flush may go once `now >= _push_tat - (push_burst - 1) *
        push_interval`, and moves it to `max(_push_tat, now) + push_interval`."""
        self._urgent: set[str] = set()
        """Neighbours owed an exchange at once (new, or restarted)."""
        self._fresh: set[str] = set()
        """Neighbours owed a catch-up push at once (new, or restarted)."""
        self.gap_wait = gap_wait
        self._gaps: dict[str, dict[str, tuple[tuple[bytes, ...], float]]] = {}
        """Per neighbour, documents its pushes left a gap in: the heads the push
        announced, and when the gap was found."""
        self._repairing: set[str] = set()
        """Neighbours a gap sync runs with."""

    # --- inputs ----------------------------------------------------------------------

    def discovered(self, address: str, now: float) -> None:
        """Discovery (mDNS, static list, simulator) names an address: greet it."""
        self.hellos.discover(address, now)

    def discovery_gone(self, node_id: str | None, address: str | None) -> None:
        if address is not None:
            self.hellos.gone(address)
        if node_id is not None:
            self.table.forget(node_id)

    def suggest(self, address: str, now: float) -> None:
        """An unverified sender names this address: greet it once (bounded, expires)."""
        self.hellos.suggest(address, now)

    def hello_done(self, address: str, ok: bool) -> None:
        self.hellos.done(address, ok)

    def hello_ok(self, node_id: str, address: str, incarnation: int | None, now: float) -> Neighbour | None:
        """A verified hello (N1 of `neighbours`): the peer is a push target from now on."""
        if node_id == self.node_id:
            return None
        n, fresh = self.table.verified(node_id, address, incarnation, now)
        if fresh:
            n.unsynced = set(self.heads)
            self._urgent.add(node_id)
            self._fresh.add(node_id)
            # What changed lately is likely news to it: push it now rather than
            # leave it to the (multi-round) sync of the first exchange.
            n.pending.update(d for d, t in self.changed_at.items() if now - t <= self.recent)
        return n

    def heard(self, node_id: str, now: float) -> Neighbour | None:
        """Any message from a verified peer keeps it alive (N2)."""
        return self.table.heard(node_id, now)

    def told_targets(self, node_id: str, targets: Iterable[str] | None) -> None:
        """The peer says whom it pushes to (used to suppress redundant relays)."""
        n = self.table.peers.get(node_id)
        if n is not None:
            n.targets = frozenset(targets) if targets is not None else None

    def peer_has(self, node_id: str, doc_id: str, heads: Iterable[bytes]) -> None:
        """The peer holds at least these heads of `doc_id` (it said so, or sent them)."""
        n = self.table.peers.get(node_id)
        if n is None:
            return
        h = tuple(sorted(heads))
        n.known[doc_id] = h
        if self.heads.get(doc_id) == h:
            n.pending.discard(doc_id)
            n.unsynced.discard(doc_id)

    def changed(self, doc_id: str, heads: Iterable[bytes], now: float, *, source: str | None = None) -> None:
        """A document changed (locally when `source` is None, else from that peer)."""
        h = tuple(sorted(heads))
        self.heads[doc_id] = h
        self.changed_at[doc_id] = now
        skip: frozenset[str] = frozenset()
        src = self.table.peers.get(source) if source is not None else None
        if src is not None and src.targets is not None:
            skip = src.targets
        for n in self.table.peers.values():
            if n.node_id == source:
                continue
            if n.known.get(doc_id) == h:
                n.pending.discard(doc_id)
                continue
            n.unsynced.add(doc_id)
            if n.node_id not in skip:
                n.pending.add(doc_id)

    def forget_doc(self, doc_id: str) -> None:
        """The document left active gossip (archived)."""
        self.heads.pop(doc_id, None)
        self.changed_at.pop(doc_id, None)
        for gaps in self._gaps.values():
            gaps.pop(doc_id, None)
        for n in self.table.peers.values():
            n.pending.discard(doc_id)
            n.unsynced.discard(doc_id)
            n.known.pop(doc_id, None)

    def settled(self, doc_id: str, now: float) -> bool:
        """Whether the document has been quiet here for `settle` seconds. Anti-entropy
        syncs a differing document only once it has settled (or is stuck, see
        `Node._anti_entropy`): while it changes, pushes are still on their way,
        and syncing it as well doubled the traffic under load."""
        return now - self.changed_at.get(doc_id, -math.inf) >= self.settle

    def known_heads(self, node_id: str, doc_id: str) -> tuple[bytes, ...]:
        n = self.table.peers.get(node_id)
        return n.known.get(doc_id, ()) if n is not None else ()

    def pushed(self, node_id: str, doc_id: str, heads: Iterable[bytes]) -> None:
        """We sent the peer everything up to `heads` (assumed delivered; anti-entropy repairs a loss)."""
        n = self.table.peers.get(node_id)
        if n is None:
            return
        n.known[doc_id] = tuple(sorted(heads))
        n.unsynced.discard(doc_id)

    def requeue(self, node_id: str, doc_ids: Iterable[str]) -> None:
        """Documents that did not fit in a push (byte cap) wait for the next flush."""
        n = self.table.peers.get(node_id)
        if n is not None:
            n.pending.update(d for d in doc_ids if d in self.heads)

    def gap(self, node_id: str, doc_id: str, heads: Iterable[bytes], now: float) -> None:
        """A push from this peer announcing `heads` brought changes whose dependencies we
        lack (for a document we do not hold yet: its first changes were lost)."""
        if node_id in self.table.peers:
            gaps = self._gaps.setdefault(node_id, {})
            since = gaps[doc_id][1] if doc_id in gaps else now
            gaps[doc_id] = (tuple(heads), since)

    def repair_done(self, node_id: str, now: float, *, ok: bool) -> None:
        """The gap sync with this peer ended (a failure counts as a failed exchange)."""
        self._repairing.discard(node_id)
        if not ok:
            self.table.failed(node_id, now)

    def exchange_done(
        self, node_id: str, now: float, *, in_sync: bool, slow: bool = False, unsynced: Iterable[str] = ()
    ) -> None:
        n = self.table.peers.get(node_id)
        if n is None:
            return
        n.exchanging = False
        self.table.ok(node_id, now, slow=slow)
        n.unsynced = set() if in_sync else set(unsynced) & set(self.heads)

    def exchange_failed(self, node_id: str, now: float) -> bool:
        """Returns True if the peer was forgotten (too many failures in a row)."""
        n = self.table.peers.get(node_id)
        if n is None:
            return False
        n.exchanging = False
        return self.table.failed(node_id, now)

    def retry_soon(self, node_id: str) -> None:
        """Exchange with this neighbour again as soon as its backoff allows, not at its
        turn: the SWIM failure detector confirms a failed probe before it suspects."""
        if node_id in self.table.peers:
            self._urgent.add(node_id)

    # --- the evaluate step -------------------------------------------------------------

    def poll(self, now: float) -> list[Action]:
        """Everything due at `now`, after all inputs so far (STYLE rule 4)."""
        actions: list[Action] = []
        self.table.expire(now)
        if now >= self._next_tick:
            self._next_tick = now + self._jittered(self.tick_interval, "tick")
            actions.append(Tick())
        peers = self.table.live()
        known_addresses = {n.address for n in peers}
        actions.extend(SendHello(a) for a in self.hellos.due(now, known_addresses))
        for nid in sorted(self._fresh):
            self._fresh.discard(nid)
            fresh = self.table.peers.get(nid)
            if fresh is not None and fresh.pending:
                actions.append(self._push(fresh, now))
        if now >= self._push_slot() and any(n.pending for n in peers):
            # One push bucket for the node, not one per link: every neighbour that
            # lacks something gets it in the same instant, so a change reaches all
            # of them together (per-link slots drifted apart, and a change waited
            # for the slowest of them).
            self._push_tat = max(self._push_tat, now) + self.push_interval
            for n in peers:
                if n.pending:
                    actions.append(self._push(n, now))
        for nid in sorted(self._gaps):
            gapped = self.table.peers.get(nid)
            if gapped is None:
                del self._gaps[nid]
            elif nid not in self._repairing and now >= gapped.retry_at:
                gaps = self._gaps[nid]
                due = sorted(d for d, (_, since) in gaps.items() if now >= since + self.gap_wait)
                if due:
                    self._repairing.add(nid)
                    actions.append(SyncDocs(nid, gapped.address, tuple(due), tuple(gaps.pop(d)[0] for d in due)))
                if not gaps:
                    del self._gaps[nid]
        for nid in sorted(self._urgent):
            urgent = self.table.peers.get(nid)
            if urgent is not None and not urgent.exchanging and now >= urgent.retry_at:
                self._urgent.discard(nid)
                actions.append(self._exchange(urgent, now))
            elif urgent is None:
                self._urgent.discard(nid)
        if now >= self._next_exchange:
            self._next_exchange = now + self._jittered(self.exchange_interval, "exchange")
            ready = [n for n in peers if not n.exchanging and now >= n.retry_at]
            if ready:
                n = min(ready, key=lambda p: (p.last_exchange, p.node_id))
                actions.append(self._exchange(n, now))
        return actions

    def _jittered(self, interval: float, what: str) -> float:
        """`interval` +-20 %, from a sequence fixed by the node (`salt`): periodic work
        of different nodes, and of different loops on one node, never falls into
        lockstep, and a simulated run still draws the same numbers every time."""
        self._draws += 1
        return interval * (0.8 + 0.4 * unit(f"{self.salt}:{what}:{self._draws}"))

    def _push_slot(self) -> float:
        """From when the push bucket holds a token (the next flush may go)."""
        return self._push_tat - (self.push_burst - 1) * self.push_interval

    def _push(self, n: Neighbour, now: float) -> SendPush:
        n.last_push = now
        docs = tuple(sorted(n.pending))
        n.pending.clear()
        return SendPush(n.node_id, n.address, docs)

    def _exchange(self, n: Neighbour, now: float) -> StartExchange:
        n.exchanging = True
        n.last_exchange = now
        return StartExchange(n.node_id, n.address)

    def next_deadline(self) -> float | None:
        """The earliest time at which `poll` has something to do without new input."""
        times = [self._next_tick, self._next_exchange if self.table.peers else math.inf]
        if any(n.pending for n in self.table.peers.values()):
            times.append(self._push_slot())
        for n in self.table.peers.values():
            if n.node_id in self._urgent and not n.exchanging:
                times.append(n.retry_at)
            if n.node_id in self._fresh and n.pending:
                times.append(n.verified_at)
            if n.node_id in self._gaps and n.node_id not in self._repairing:
                first = min(since for _, since in self._gaps[n.node_id].values()) + self.gap_wait
                times.append(max(n.retry_at, first))
        expiry = self.table.next_expiry()
        if expiry is not None:
            times.append(expiry)
        hello = self.hellos.next_deadline({n.address for n in self.table.peers.values()})
        if hello is not None:
            times.append(hello)
        t = min(times)
        return None if t == math.inf else t

    # --- views -------------------------------------------------------------------------

    def push_targets(self) -> list[str]:
        """Ids we push to (told to peers so they can skip relaying to them)."""
        return sorted(self.table.peers)

    def documents_not_everywhere(self) -> set[str]:
        return {d for n in self.table.peers.values() for d in n.unsynced}


__all__ = ["Replicator"]
