"""The neighbour table: peers this node talks to directly, sans-IO.

Rules
-----

N1. A peer exists only after a verified hello: our POST /m/hello to its address
    was answered by that node id, or (enrolled site) a sealed message arrived whose
    certificate names that node id (`authenticated_peer`). Nothing an unverified
    sender says creates an entry here (issue 10 item 5: 31 unverified ids once
    became permanent peers). An unverified sender may at most put its address on
    the bounded list of addresses to greet (`Hellos`), which expires.
N2. A peer is forgotten after `max_failures` exchanges in a row failed, when
    discovery says it left, or when we have not heard from it (any message) for
    the TTL *and* have asked it since (an exchange started after we last heard
    it). Silence alone is not evidence: anti-entropy asks one neighbour per
    interval, so with ten neighbours and the 8 s idle interval our turn to ask a
    live one comes every 64-96 s, and two idle neighbours' exchanges (ours and
    theirs) left gaps above the 60 s TTL for about half the pairs: live neighbours
    were forgotten, greeted again and caught up, every cycle. An exchange in
    flight is waited for. A neighbour that has gone fails the exchange we start,
    and is forgotten then if it has been silent for the TTL (else by its failures).
    The TTL is `ttl` or three rounds of our exchanges (`round_s`: the interval
    times the number of neighbours), whichever is longer: with a 60 s TTL and
    such gaps, one lost message of an idle exchange (2 % loss, mesh200) forgot a
    live neighbour, which was greeted again (docs/sim.md, the idle mesh's hellos).
    Three rounds: a live peer is asked (oldest first) at least once a round, so
    only a run of lost exchanges in both directions stays silent that long; a
    dead one is still forgotten after `max_failures` exchanges, one a round.
    To come back it needs a new verified hello.
N3. A peer that fails (timeout, refusal) or answers slowly is backed off: the
    next exchange with it waits `base * 2**failures` seconds (up to `max_backoff`),
    scaled by a jitter fixed by the pair and the count (reproducible in the
    simulator, never drawn from a shared random stream). A slow answer is an
    answer: it backs the peer off (`base * 2**slow`, at most `max_slow_backoff`)
    but is not a failure, so it never counts towards forgetting the peer (N2)
    and ends a run of failures. Counted as failures, a loaded but live peer was
    forgotten like a dead one (field suite: two slow answers and one lost
    exchange), and came back only after a new hello.
N4. A peer whose incarnation changes (it restarted) loses what we believed it
    holds: its known heads start empty.
N5. Anti-entropy backs off while the mesh agrees (`Cadence`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field


def unit(key: str) -> float:
    """A number in [0, 1) fixed by `key` (deterministic jitter)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


@dataclass
class Neighbour:
    """What the core knows about one verified direct peer."""

    node_id: str
    address: str
    incarnation: int | None
    verified_at: float
    last_heard: float
    failures: int = 0
    """Exchanges in a row that failed (N2, N3)."""
    slow: int = 0
    """Answers in a row that came late (N3: backoff only)."""
    retry_at: float = -math.inf
    """No exchange with this peer before this time (N3)."""
    last_exchange: float = -math.inf
    exchanging: bool = False
    targets: frozenset[str] | None = None
    """The peers it pushes to, as it last told us (relay suppression)."""
    known: dict[str, tuple[bytes, ...]] = field(default_factory=dict)
    """Per document, heads we believe it holds (it told us, or we pushed them)."""
    pending: set[str] = field(default_factory=set)
    """Documents to push to it at its next flush."""
    last_push: float = -math.inf
    unsynced: set[str] = field(default_factory=set)
    """Documents it may lack or hold in another version (for status)."""


class NeighbourTable:
    """Verified direct peers (N1-N4). Every method takes `now`; nothing reads a clock."""

    def __init__(
        self,
        *,
        ttl: float,
        max_failures: int = 3,
        base_backoff: float = 1.0,
        max_backoff: float = 30.0,
        max_slow_backoff: float = 8.0,
        salt: str = "",
    ) -> None:
        self.ttl = ttl
        self.max_failures = max_failures
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.max_slow_backoff = max_slow_backoff
        self.salt = salt
        self.peers: dict[str, Neighbour] = {}
        """Every verified peer by id. Add and remove entries through the methods
        below only: `live()`, `addresses()` and the expiry are kept from them."""
        self._live: list[Neighbour] | None = None
        self._addresses: set[str] | None = None
        self._failing: set[str] = set()
        """Peers whose last exchange failed: the only ones that can expire (N2: a
        peer expires only once an exchange we started after we last heard it has
        ended without an answer, which is a failure)."""

    def _changed(self) -> None:
        """The set of peers or an address changed: drop the cached views."""
        self._live = None
        self._addresses = None

    def verified(self, node_id: str, address: str, incarnation: int | None, now: float) -> tuple[Neighbour, bool]:
        """Record a verified hello (N1). Returns the entry and whether it is new (or restarted)."""
        n = self.peers.get(node_id)
        if n is None:
            n = self.peers[node_id] = Neighbour(node_id, address, incarnation, now, now)
            self._changed()
            return n, True
        fresh = incarnation is not None and n.incarnation is not None and incarnation != n.incarnation
        if fresh:
            n.known.clear()  # N4
        if incarnation is not None:
            n.incarnation = incarnation
        if n.address != address:
            n.address = address
            self._changed()
        n.last_heard = max(n.last_heard, now)
        n.failures = 0
        self._failing.discard(node_id)
        n.slow = 0
        n.retry_at = -math.inf
        return n, fresh

    def heard(self, node_id: str, now: float) -> Neighbour | None:
        n = self.peers.get(node_id)
        if n is not None:
            n.last_heard = max(n.last_heard, now)
        return n

    def ok(self, node_id: str, now: float, *, slow: bool = False) -> None:
        n = self.heard(node_id, now)
        if n is None:
            return
        n.failures = 0  # it answered: not dead (N2)
        self._failing.discard(node_id)
        if slow:
            # N3: an overloaded peer answers, but late: give it room before the next one.
            n.slow = min(n.slow + 1, 10)
            n.retry_at = now + self._jitter(n, "slow", n.slow) * min(
                self.max_slow_backoff, self.base_backoff * 2.0 ** min(n.slow, 6)
            )
        else:
            n.slow = 0
            n.retry_at = -math.inf

    def failed(self, node_id: str, now: float) -> bool:
        """An exchange with the peer failed. Returns True if it was forgotten (N2)."""
        n = self.peers.get(node_id)
        if n is None:
            return False
        n.failures += 1
        if n.failures >= self.max_failures:
            self.forget(node_id)
            return True
        self._failing.add(node_id)
        n.retry_at = now + self._backoff(n)
        return False

    def _backoff(self, n: Neighbour) -> float:
        return self._jitter(n, "", n.failures) * min(self.max_backoff, self.base_backoff * 2.0 ** min(n.failures, 6))

    def _jitter(self, n: Neighbour, what: str, count: int) -> float:
        return 0.5 + 0.5 * unit(f"{self.salt}:{n.node_id}:{what}{count}")

    def forget(self, node_id: str) -> bool:
        self._failing.discard(node_id)
        if self.peers.pop(node_id, None) is None:
            return False
        self._changed()
        return True

    def ttl_for(self, round_s: float) -> float:
        """The silence that may forget a peer (N2), given how long one round of our
        exchanges takes (exchange interval x neighbours)."""
        return max(self.ttl, 3.0 * round_s)

    def expire(self, now: float, round_s: float = 0.0) -> list[str]:
        """Forget peers silent for the TTL that we have asked since they were last heard (N2)."""
        if not self._failing:
            return []
        ttl = self.ttl_for(round_s)
        gone = sorted(nid for nid in self._failing if nid in self.peers and self._stale(self.peers[nid], now, ttl))
        for nid in gone:
            self.forget(nid)
        return gone

    def live(self) -> list[Neighbour]:
        """Every current peer, sorted by id (entries expire, so present means live).
        Kept between changes of the table (the engine asks at every wake-up)."""
        if self._live is None:
            self._live = [self.peers[nid] for nid in sorted(self.peers)]
        return self._live

    def addresses(self) -> set[str]:
        """The addresses of every current peer (do not modify; kept like `live`)."""
        if self._addresses is None:
            self._addresses = {n.address for n in self.peers.values()}
        return self._addresses

    def _stale(self, n: Neighbour, now: float, ttl: float) -> bool:
        # N2: silent for the TTL, and an exchange we started since it was heard has ended
        # without an answer (one in flight is waited for: its answer would be news).
        return now - n.last_heard >= ttl and n.last_exchange > n.last_heard and not n.exchanging

    def next_expiry(self, round_s: float = 0.0) -> float | None:
        """When `expire` forgets someone next, if no input comes first (starting or ending
        an exchange is an input: a peer not asked since it was heard has no expiry yet)."""
        ttl = self.ttl_for(round_s)
        times = (
            n.last_heard + ttl
            for nid in self._failing
            if (n := self.peers.get(nid)) is not None and n.last_exchange > n.last_heard and not n.exchanging
        )
        return min(times, default=None)


class Cadence:
    """How often anti-entropy runs (N5): `base` while something differs, slower while all agree.

    N5. An exchange that finds the peer in agreement (same heads-hash, same
        membership digest) is *quiet*; each quiet exchange doubles the interval up
        to `idle`. Anything that differs (an exchange that finds a difference, a
        change, a new neighbour, membership news) is *busy* and brings it back
        to `base` at once. An idle mesh thus exchanges one small heads-hash and
        digest per node every `idle` seconds, and a mesh with something to
        settle checks as often as before.
    """

    def __init__(self, base: float, idle: float) -> None:
        if not (0 < base <= idle and math.isfinite(idle)):
            raise ValueError(f"need 0 < base <= idle (finite), got {base!r}, {idle!r}")
        self.base = base
        self.idle = idle
        self.interval = base

    def quiet(self) -> float:
        """An exchange found nothing to do: back off (N5). Returns the new interval."""
        self.interval = min(self.idle, self.interval * 2.0)
        return self.interval

    def busy(self) -> float:
        """Something differs or changed: back to `base` (N5). Returns the new interval."""
        self.interval = self.base
        return self.interval


@dataclass
class _Greeting:
    due: float
    attempts: int = 0
    expires: float = math.inf
    sent: bool = False


class Hellos:
    """Addresses to greet with a hello: discovered ones (kept until discovery says
    they left, retried with backoff) and ones named by unverified senders (at most
    `max_unverified`, dropped after one attempt or `unverified_ttl`) (N1)."""

    def __init__(
        self, *, max_unverified: int = 32, unverified_ttl: float = 30.0, base: float = 1.0, max_backoff: float = 30.0
    ) -> None:
        self.max_unverified = max_unverified
        self.unverified_ttl = unverified_ttl
        self.base = base
        self.max_backoff = max_backoff
        self.discovered: dict[str, _Greeting] = {}
        self.unverified: dict[str, _Greeting] = {}
        self.in_flight: set[str] = set()

    def discover(self, address: str, now: float) -> None:
        g = self.discovered.get(address)
        if g is None:
            self.discovered[address] = _Greeting(now)
        else:
            g.due = min(g.due, now)

    def gone(self, address: str) -> None:
        self.discovered.pop(address, None)

    def suggest(self, address: str, now: float) -> None:
        """An unverified sender claims this address: greet it once, if there is room.
        A discovered address is greeted now instead of after its backoff (it has
        just shown that it is up)."""
        g = self.discovered.get(address)
        if g is not None:
            g.due = min(g.due, now)
            return
        if address in self.unverified or address in self.in_flight:
            return
        if len(self.unverified) >= self.max_unverified:
            return
        self.unverified[address] = _Greeting(now, expires=now + self.unverified_ttl)

    def due(self, now: float, known: set[str]) -> list[str]:
        """Addresses to greet now. `known`: addresses of verified peers (nothing to do)."""
        out = []
        for address in sorted(self.unverified):
            g = self.unverified[address]
            if now >= g.expires or address in known:
                del self.unverified[address]
            elif now >= g.due and address not in self.in_flight:
                del self.unverified[address]
                out.append(address)
        for address in sorted(self.discovered):
            g = self.discovered[address]
            if address in known or address in self.in_flight or now < g.due:
                continue
            g.attempts += 1
            g.due = now + min(self.max_backoff, self.base * 2.0 ** min(g.attempts, 5))
            out.append(address)
        self.in_flight.update(out)
        return out

    def done(self, address: str, ok: bool) -> None:
        self.in_flight.discard(address)
        if ok:
            g = self.discovered.get(address)
            if g is not None:
                g.attempts = 0

    def next_deadline(self, known: set[str]) -> float | None:
        times = [g.due for a, g in self.discovered.items() if a not in known and a not in self.in_flight]
        times += [min(g.due, g.expires) for g in self.unverified.values()]
        return min(times, default=None)


__all__ = ["Cadence", "Hellos", "Neighbour", "NeighbourTable", "unit"]
