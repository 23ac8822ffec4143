"""The replication engine's decisions, sans-IO: whom to push what, when to check, whom to greet.

The trio layer (`meshnode.Node`) feeds every input here with the time it read
once at the edge, then calls `poll(now)` and carries out the actions it returns
(`meshnode.core.messages`), and sleeps until `next_deadline()` or the next input.
Nothing here opens a socket, calls trio or reads a clock (STYLE rules 1, 2, 4).

How a change travels (docs/protocol.md, protocol version 4)
-----------------------------------------------------------

- A change, local or received, marks the document *pending* for every verified
  neighbour that may lack it: not the peer it came from, not the peers that one
  told us it pushes to itself (they get it from the source), not a peer whose
  known heads already equal ours.
- The node has one push *budget* in messages, not a timer: every change that
  leaves something pending earns `push_credits` (13.5) credits (saved up to
  `push_credit_cap`, 54), and a flush costs one credit per push it sends. A
  flush pushes, in the same instant, to every neighbour with something
  pending; it goes at once when the budget covers it, else when its oldest
  pending change has waited `push_interval` (a *timer flush*, which may run
  the budget into debt, down to minus the cap). So a node with fewer
  neighbours than `push_credits` pushes every change at once, whatever its
  write rate (bench/mesh.py --sim, 10 nodes, one event every ~80 ms from a
  random node: p95 1 ms; 310 ms with the token bucket of two flushes per 0.4 s
  this replaces, which absorbed bursts but not a rate); a node with more
  batches about `degree / push_credits` changes per flush, so a change costs
  about `push_credits` pushes however large the mesh. bench/glomers.py (24
  neighbours, 4 changes/s a node): a change waits for the next one about
  `1 - 13.5/24` of the time (0.25 s), so the median is one link (0.1 s);
  fewer credits than half the degree would put the median at the wait, more
  cost messages (per event, with the bucket's 17.5: 15 credits 18.6, 14
  credits 17.6, 13.5 credits 17.2; with a cap of two changes' worth instead of
  four, credits were clipped and half the changes waited: median 0.35 s). Paid flushes have a ceiling, `flush_burst` (4) at once
  and then one per `flush_gap` (50 ms): a node that relays a flood of changes
  to a few neighbours batches them instead of sending a push per change
  (STYLE 17: overload sheds work). A push is one-way (no response): the
  changes the peer lacks, computed from the heads we believe it holds.
- A neighbour verified just now (new, or restarted) gets what changed lately in
  a catch-up push at once, outside the budget: it is a push target from its first
  hello, and a node that boots into a busy mesh does not wait for a flush
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
2. Pushes, besides one catch-up push to a freshly verified neighbour, are paid
   for: over any span of `L` seconds in which `C` changes earned credits, a node
   with `D` neighbours sends at most `2 * push_credit_cap + C * push_credits +
   D * (1 + L / push_interval)` of them (what the budget held and earned, plus
   timer flushes, at least `push_interval` apart), and at most `flush_burst + L
   / flush_gap + 1 + L / push_interval` flushes whatever the changes (the
   ceiling); a pending change waits at most `push_interval`; at most one
   exchange per neighbour at a time; none while it is backed off.
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
        push_interval: the longest a pending change waits for a flush when the
            budget does not cover one (and the least time between two such
            timer flushes).
        push_credits: pushes (messages) each change that leaves something
            pending adds to the push budget.
        push_credit_cap: the most the budget saves (default: four changes'
            worth, so that with up to 40 neighbours a change never loses
            credits to the cap that the flush it waits for needs); also the
            deepest debt a timer flush may run it into.
        flush_gap, flush_burst: flushes the budget pays for go at most one per
            `flush_gap` seconds on average, `flush_burst` at once (a ceiling
            under overload: a relay of a busy mesh batches again).
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
        push_credits: float = 13.5,
        push_credit_cap: float | None = None,
        flush_gap: float = 0.05,
        flush_burst: int = 4,
        exchange_interval: float = 1.0,
        tick_interval: float = 1.0,
        ttl: float = 60.0,
        salt: str = "",
        settle: float = 1.0,
        recent: float = 30.0,
        gap_wait: float = 0.2,
    ) -> None:
        cap = 4.0 * push_credits if push_credit_cap is None else push_credit_cap
        if not (push_interval > 0 and push_credits >= 1 and cap >= push_credits and flush_gap > 0 and flush_burst >= 1):
            raise ValueError(
                "push budget: need push_interval > 0, push_credits >= 1, push_credit_cap >= push_credits,"
                f" flush_gap > 0 and flush_burst >= 1, got {push_interval}, {push_credits}, {cap}, {flush_gap},"
                f" {flush_burst}"
            )
        self.flush_gap = flush_gap
        self.flush_burst = flush_burst
        self._flush_tat = -math.inf
        """The ceiling on paid flushes as a GCRA (ITU-T I.371; a token bucket in one
        number): a paid flush may go once `now >= _flush_tat - (flush_burst - 1) *
        flush_gap`, and moves it to `max(_flush_tat, now) + flush_gap`."""
        self.node_id = node_id
        self.push_interval = push_interval
        self.push_credits = push_credits
        self.push_credit_cap = cap
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
        self.credits = cap
        """The push budget, in messages: + `push_credits` per change that leaves
        something pending (up to the cap), - one per push a flush sends (down to
        minus the cap)."""
        self._pending_peers: set[str] = set()
        """Neighbours with something pending (kept exact by every method that
        changes a `Neighbour.pending`, so `poll` and `next_deadline` never scan
        the whole table for it)."""
        self._pending_since: float | None = None
        """When the oldest change pending since the last flush was made."""
        self._last_flush = -math.inf
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
            if n.pending:
                self._pending_peers.add(node_id)
                if self._pending_since is None:
                    self._pending_since = now
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
            self._unpend(n, doc_id)
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
        work = False
        for n in self.table.peers.values():
            if n.node_id == source:
                continue
            if n.known.get(doc_id) == h:
                self._unpend(n, doc_id)
                continue
            n.unsynced.add(doc_id)
            if n.node_id not in skip:
                n.pending.add(doc_id)
                self._pending_peers.add(n.node_id)
                work = True
        if work:
            # The change pays for its pushes (invariant 2); one that only others
            # carry (a relay every neighbour gets from the source) earns nothing.
            self.credits = min(self.push_credit_cap, self.credits + self.push_credits)
            if self._pending_since is None:
                self._pending_since = now

    def forget_doc(self, doc_id: str) -> None:
        """The document left active gossip (archived)."""
        self.heads.pop(doc_id, None)
        self.changed_at.pop(doc_id, None)
        for gaps in self._gaps.values():
            gaps.pop(doc_id, None)
        for n in self.table.peers.values():
            self._unpend(n, doc_id)
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
            if n.pending:
                self._pending_peers.add(node_id)
                if self._pending_since is None:
                    self._pending_since = self._last_flush  # they have waited since it

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
        self.table.expire(now, self._round())
        if now >= self._next_tick:
            self._next_tick = now + self._jittered(self.tick_interval, "tick")
            actions.append(Tick())
        actions.extend(SendHello(a) for a in self.hellos.due(now, self.table.addresses()))
        for nid in sorted(self._fresh):
            self._fresh.discard(nid)
            fresh = self.table.peers.get(nid)
            if fresh is not None and fresh.pending:
                actions.append(self._push(fresh, now))
        flush = self._pending()
        paid = bool(flush) and self.credits >= len(flush) and now >= self._flush_slot()
        if flush and (paid or self._timer_flush_at() <= now):
            # One flush for the node, not one per link: every neighbour that lacks
            # something gets it in the same instant, so a change reaches all of
            # them together (per-link slots drifted apart, and a change waited for
            # the slowest of them).
            self.credits = max(-self.push_credit_cap, self.credits - len(flush))
            self._pending_since = None
            self._last_flush = now
            if paid:
                self._flush_tat = max(self._flush_tat, now) + self.flush_gap
            for n in flush:
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
            ready = [n for n in self.table.live() if not n.exchanging and now >= n.retry_at]
            if ready:
                n = min(ready, key=lambda p: (p.last_exchange, p.node_id))
                actions.append(self._exchange(n, now))
        return actions

    def set_pace(self, interval: float, now: float) -> bool:
        """The anti-entropy and housekeeping period from now on (`Cadence`, N5).

        A shorter one also pulls in the exchange and the tick already scheduled at the
        longer one: news that made the node busy (a suspicion to spread, a difference
        found) goes out within the new period, not after the idle one. A longer one
        leaves them where they are. Returns whether `next_deadline` may have moved earlier.
        """
        shorter = interval < self.exchange_interval
        self.exchange_interval = self.tick_interval = interval
        if shorter:
            self._next_exchange = min(self._next_exchange, now + self._jittered(interval, "exchange"))
            self._next_tick = min(self._next_tick, now + self._jittered(interval, "tick"))
        return shorter

    def _round(self) -> float:
        """How long one round of anti-entropy takes: every neighbour asked once (N2)."""
        return self.exchange_interval * len(self.table.peers)

    def _jittered(self, interval: float, what: str) -> float:
        """`interval` +-20 %, from a sequence fixed by the node (`salt`): periodic work
        of different nodes, and of different loops on one node, never falls into
        lockstep, and a simulated run still draws the same numbers every time."""
        self._draws += 1
        return interval * (0.8 + 0.4 * unit(f"{self.salt}:{what}:{self._draws}"))

    def _pending(self) -> list[Neighbour]:
        """Neighbours with something pending, by id (drops those forgotten meanwhile)."""
        out = []
        for nid in sorted(self._pending_peers):
            n = self.table.peers.get(nid)
            if n is not None and n.pending:
                out.append(n)
            else:
                self._pending_peers.discard(nid)
        if not out:
            self._pending_since = None
        elif self._pending_since is None:  # (not reached: every path that pends sets it)
            self._pending_since = self._last_flush
        return out

    def _flush_slot(self) -> float:
        """From when the ceiling lets a paid flush go."""
        return self._flush_tat - (self.flush_burst - 1) * self.flush_gap

    def _timer_flush_at(self) -> float:
        """When the pending changes go whatever the budget holds."""
        return math.inf if self._pending_since is None else self._pending_since + self.push_interval

    def _unpend(self, n: Neighbour, doc_id: str) -> None:
        n.pending.discard(doc_id)
        if not n.pending:
            self._pending_peers.discard(n.node_id)

    def _push(self, n: Neighbour, now: float) -> SendPush:
        n.last_push = now
        docs = tuple(sorted(n.pending))
        n.pending.clear()
        self._pending_peers.discard(n.node_id)
        return SendPush(n.node_id, n.address, docs)

    def _exchange(self, n: Neighbour, now: float) -> StartExchange:
        n.exchanging = True
        n.last_exchange = now
        return StartExchange(n.node_id, n.address)

    def next_deadline(self) -> float | None:
        """The earliest time at which `poll` has something to do without new input."""
        peers = self.table.peers
        times = [self._next_tick, self._next_exchange if peers else math.inf]
        due = self._pending()
        if due:
            # Covered by the budget: due now (a flush the last poll could not make
            # yet because the change came after it), else at the timer.
            at = self._timer_flush_at()
            if self.credits >= len(due):  # paid: due now, or when the ceiling allows
                at = min(at, max(at - self.push_interval, self._flush_slot()))
            times.append(at)
        # Only the few neighbours owed something are looked at, not the whole table.
        for nid in self._urgent:
            n = peers.get(nid)
            if n is not None and not n.exchanging:
                times.append(n.retry_at)
        for nid in self._fresh:
            n = peers.get(nid)
            if n is not None and n.pending:
                times.append(n.verified_at)
        for nid, gaps in self._gaps.items():
            n = peers.get(nid)
            if n is not None and nid not in self._repairing and gaps:
                first = min(since for _, since in gaps.values()) + self.gap_wait
                times.append(max(n.retry_at, first))
        expiry = self.table.next_expiry(self._round())
        if expiry is not None:
            times.append(expiry)
        hello = self.hellos.next_deadline(self.table.addresses())
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
