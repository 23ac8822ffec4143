"""SimNetwork: the in-memory transport network with links that behave like radio.

It is a `meshnode._transport.MemoryNetwork` (so the node runs on the same fake
transport as in the tests, carrying bytes only) that fills in both hooks:

- `deliverable` / `link_up`: a message reaches its destination only over an
  edge of the topology that no partition cuts at the moment it *arrives*. A
  message to a node out of range, or across a cut, is silence: the requester
  waits until its own timeout, as over UDP.
- `carry`: every message (a request, then its response) is lost with the link's
  loss rate, else crosses after ``latency + size * 8 / bandwidth`` seconds of
  virtual time. There is no queueing: messages on one link do not wait for
  each other (a link's bandwidth bounds each message, not their sum), and CoAP's
  block-wise transfer is not modelled (one message, one latency).

Reproducibility. trio runs the tasks woken at one virtual instant in an order
it shuffles on purpose, so a network that drew from one shared random stream
would hand out its numbers in a different order every run. Instead, each
message's fate is a pure function of what it is: SHA-256 over the run's seed,
source, destination, resource, direction, the virtual time it was sent and its
payload bytes (plus an occurrence number for byte-identical messages sent on
the same link at the same instant, which are interchangeable). Two uniform
numbers from that digest decide loss and latency by inverse transform.

Counters (for metrics): messages and payload bytes sent, per node and in
total, messages lost in flight, and messages that found no link (out of
range, partitioned, or the peer down).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from meshnode import MemoryNetwork

from ._scenario import Dist, LinkSpec

log = logging.getLogger("sim.network")


@dataclass(frozen=True)
class Link:
    """A link's effective behaviour (the scenario's default with overrides applied)."""

    latency: Dist
    loss: float
    bandwidth_bps: float

    @classmethod
    def of(cls, spec: LinkSpec, default: LinkSpec) -> Link:
        latency = spec.latency or default.latency
        loss = spec.loss if spec.loss is not None else default.loss
        bw = spec.bandwidth_kbps or default.bandwidth_kbps
        assert latency is not None and loss is not None and bw is not None
        return cls(latency, loss, bw * 1000.0)


@dataclass
class TrafficCounters:
    messages: int = 0
    bytes: int = 0
    lost: int = 0
    """Lost in flight (the link's loss rate)."""
    undeliverable: int = 0
    """Arrived where no link, no live peer, or a partition was."""


class SimNetwork(MemoryNetwork):
    """A MemoryNetwork whose links follow a topology, with loss, latency, bandwidth and partitions.

    Args:
        seed: the run's seed; every message's fate derives from it and the message.
        addresses: node id -> "host:port" of every node that may ever run.
        edges: pairs of node ids that can hear each other.
        default: the link behaviour where no override applies.
        overrides: per-edge link behaviour (either orientation of the pair).
    """

    def __init__(
        self,
        seed: int,
        addresses: Mapping[str, str],
        edges: Iterable[tuple[str, str]],
        default: LinkSpec,
        overrides: Mapping[tuple[str, str], LinkSpec] | None = None,
    ) -> None:
        super().__init__()
        self._seed = str(seed).encode()
        self._ids = {address: node_id for node_id, address in addresses.items()}
        self._edges = {frozenset(e) for e in edges}
        self._default = Link.of(default, default)
        self._links = {frozenset(k): Link.of(v, default) for k, v in (overrides or {}).items()}
        self._group: dict[str, int] | None = None
        self._instant: float | None = None
        self._seen: Counter[bytes] = Counter()
        self.total = TrafficCounters()
        self.by_resource: Counter[str] = Counter()
        self.bytes_by_resource: Counter[str] = Counter()
        self.sent_by_node: Counter[str] = Counter()
        self._routes: dict[tuple[str, str], tuple[str, str, Link, Any] | None] = {}
        """(src address, dst address) -> (src id, dst id, link, hash of the fate's prefix),
        or None where no edge is: filled as messages go (see `_route`)."""
        self.trace: list[tuple[float, str, str, str, bool, int, str]] | None = None
        """Set to a list to record every message (time, src, dst, resource, response,
        size, digest of the payload): for hunting down a loss of reproducibility."""

    # --- the topology and its cuts -----------------------------------------------------

    def link(self, a: str, b: str) -> Link:
        return self._links.get(frozenset((a, b)), self._default)

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Cut every link between nodes of different groups (nodes in no group form one more)."""
        group: dict[str, int] = {}
        for i, members in enumerate(groups, 1):
            for node_id in members:
                group[node_id] = i
        self._group = group
        log.info("partition: %s", [sorted(g) for g in groups])

    def heal(self) -> None:
        self._group = None
        log.info("partition healed")

    def connected(self, a: str, b: str) -> bool:
        """Whether nodes a and b can hear each other now (an edge, not cut)."""
        if frozenset((a, b)) not in self._edges:
            return False
        return self._uncut(a, b)

    def _uncut(self, a: str, b: str) -> bool:
        group = self._group
        return group is None or group.get(a, 0) == group.get(b, 0)

    def link_up(self, a: str, b: str) -> bool:
        route = self._route(a, b)
        if route is None:
            if a in self._ids and b in self._ids:
                return False  # no edge between two nodes
            return super().link_up(a, b)
        return self._uncut(route[0], route[1]) and super().link_up(a, b)

    def _route(self, src: str, dst: str) -> tuple[str, str, Link, Any] | None:
        """The edge between two addresses, if their nodes have one (cached: the topology is fixed)."""
        key = (src, dst)
        try:
            return self._routes[key]
        except KeyError:
            pass
        ia, ib = self._ids.get(src), self._ids.get(dst)
        route = None
        if ia is not None and ib is not None and frozenset((ia, ib)) in self._edges:
            prefix = hashlib.sha256(b"%s|%s|%s|" % (self._seed, src.encode(), dst.encode()))
            route = (ia, ib, self.link(ia, ib), prefix)
        self._routes[key] = route
        return route

    # --- time on the wire ----------------------------------------------------------------

    def _fate(self, src: str, dst: str, resource: str, payload: bytes, response: bool) -> tuple[float, float]:
        """Two uniform numbers in [0, 1) that only this message can draw."""
        prefix = hashlib.sha256(b"%s|%s|%s|" % (self._seed, src.encode(), dst.encode()))
        return self._draw(prefix, resource, payload, response, trio.current_time())

    def _draw(self, prefix: Any, resource: str, payload: bytes, response: bool, now: float) -> tuple[float, float]:
        """`_fate` with the hash of its prefix (seed, source, destination) taken in
        already (`_route` keeps one per route): one hash over all of it, in two parts."""
        if now != self._instant:
            self._instant = now
            self._seen.clear()
        h = prefix.copy()
        h.update(b"%s|%d|%r|" % (resource.encode(), response, now))
        h.update(payload)
        digest = h.digest()
        seen = self._seen
        n = seen[digest]
        seen[digest] = n + 1
        if n:
            digest = hashlib.sha256(digest + n.to_bytes(8, "big")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64, int.from_bytes(digest[8:16], "big") / 2.0**64

    async def carry(self, src: str, dst: str, resource: str, payload: bytes, *, response: bool) -> bool:
        size = len(payload)
        now = trio.current_time()
        if self.trace is not None:
            digest = hashlib.sha256(payload).hexdigest()[:12]
            self.trace.append((now, src, dst, resource, response, size, digest))
        total = self.total
        total.messages += 1
        total.bytes += size
        self.by_resource[resource] += 1
        self.bytes_by_resource[resource] += size
        self.sent_by_node[self._ids.get(src, src)] += 1
        route = self._route(src, dst)
        if route is None:
            # Out of range: nobody hears it (counted as sent: the radio sent it).
            total.undeliverable += 1
            return False
        ia, ib, link, prefix = route
        u_loss, u_delay = self._draw(prefix, resource, payload, response, now)
        if u_loss < link.loss:
            total.lost += 1
            return False
        await trio.sleep_until(now + (link.latency.sample(u_delay) + size * 8.0 / link.bandwidth_bps))
        if not self._uncut(ia, ib):
            total.undeliverable += 1
            return False
        return True
