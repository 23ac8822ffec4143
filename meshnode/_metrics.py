"""Prometheus metrics of a node, read at scrape time (`GET /metrics`).

The node already keeps the numbers an operator alerts on: the forwarder's
planner (what the cloud has not confirmed), the transport's dispatcher and the
sealed transport (requests and refusals), the node's own counters and its
membership view. `NodeCollector` reads them when Prometheus scrapes, so no hot
path gains a metrics call and the exposition cannot drift from `/v1/status`.
The one thing that is not a counter somewhere is the time from a session's stop
to its receipt on this node: a histogram fed by the node's change listeners.

Every app gets its own `CollectorRegistry` (tests and the simulator run several
nodes in one process; the global registry would mix them). The exposition is
`prometheus_client`'s; nothing here writes the text format by hand. It is imported
at the first scrape, not before (about 1.2 MB of an idle node that nobody scrapes):
the histogram counts its observations in plain numbers until then, and the
collectors are registered by duck type (`collect`), which the registry accepts.
See docs/metrics.md for the list and a scrape config.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from crdt import SITE_CONFIG_ID
from uplink import PRIORITY_METER, PRIORITY_STATE

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

    from ._node import Node

log = logging.getLogger("meshnode.metrics")

PREFIX = "meshnode_"
SYNC_STATES = ("OFFLINE", "SYNCING", "SYNCED")
PRIORITY_NAMES = {PRIORITY_STATE: "state", PRIORITY_METER: "meter"}
RECONCILE_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
"""Stop-to-receipt seconds: a second on a live uplink, hours after an outage."""


def _dispatcher_counts(transport: Any) -> tuple[Counter[str], int, int]:
    """(refused requests by code, requests received, error answers) of the node's transport.

    The sealed transport wraps the CoAP (or in-memory) one; the dispatcher that maps
    outcomes to codes belongs to the innermost.
    """
    inner = transport
    while getattr(inner, "inner", None) is not None:
        inner = inner.inner
    codes: Counter[str] = Counter()
    dispatcher = getattr(inner, "_dispatcher", None)
    if dispatcher is not None:
        for key, n in dispatcher.refusals.counts.items():
            if isinstance(key, tuple) and key:
                codes[str(key[0])] += n
    stats = transport.stats
    return codes, stats.requests_received, stats.errors


class NodeCollector:
    """Reads a node's counters and views at scrape time (a prometheus_client collector)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        node = self.node
        labels = {"node_id": node.node_id, "site": node.config.site}
        names, values = list(labels), list(labels.values())

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=[*names, *extra])

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, labels=[*names, *extra])

        # Forwarding to the cloud: what the cloud has not confirmed.
        queued = gauge(
            "queued_changes", "Documents with changes the cloud has not confirmed, by priority", ("priority",)
        )
        unsent = gauge("unsent_events", "Events in documents the cloud has not confirmed")
        by_priority: Counter[str] = Counter({name: 0 for name in PRIORITY_NAMES.values()})
        events = 0
        forwarder = node.forwarder
        if forwarder is not None:
            for doc_id, priority in forwarder.planner.waiting().items():
                by_priority[PRIORITY_NAMES.get(priority, str(priority))] += 1
                events += self._event_count(doc_id)
        for name, n in sorted(by_priority.items()):
            queued.add_metric([*values, name], n)
        unsent.add_metric(values, events)
        yield queued
        yield unsent
        if forwarder is not None:
            fc = forwarder.counters
            c = counter("forward_batches", "Batches the cloud answered in full")
            c.add_metric(values, fc.batches)
            yield c
            c = counter("forward_bytes", "Request bytes (compressed) the cloud answered")
            c.add_metric(values, fc.bytes_sent)
            yield c

        # Conflicts in the sessions this node holds, by kind (the fold's report).
        conflicts = gauge("conflicts", "Conflicts reported by the fold of the sessions this node holds", ("kind",))
        kinds: Counter[str] = Counter()
        states: Counter[str] = Counter()
        for doc_id in sorted(node.replica.docs):
            if doc_id == SITE_CONFIG_ID:
                continue
            try:
                _, view = node.fold(doc_id)
            except Exception:
                continue
            states[view.state] += 1
            for conflict in view.conflicts:
                kinds[conflict.kind] += 1
        for kind, n in sorted(kinds.items()):
            conflicts.add_metric([*values, kind], n)
        yield conflicts
        sessions = gauge("sessions", "Sessions this node holds (not archived), by state", ("state",))
        for name, n in sorted(states.items()):
            sessions.add_metric([*values, name], n)
        yield sessions

        # Mesh: connectivity, peers, leader.
        status = self._status()
        state = gauge(
            "connectivity_state", "1 for the node's current sync state (OFFLINE, SYNCING, SYNCED)", ("state",)
        )
        current = status.get("sync_state") if status else None
        for name in SYNC_STATES:
            state.add_metric([*values, name], 1.0 if name == current else 0.0)
        yield state
        peers = gauge("peers_alive", "Members of the mesh this node sees alive (suspect counts as alive)")
        peers.add_metric(values, sum(1 for p in (status or {}).get("peers", []) if p["state"] != "dead"))
        yield peers
        leader = gauge("is_leader", "1 while this node is the elected leader (forwards to the cloud)")
        leader.add_metric(values, 1.0 if node.leader == node.node_id else 0.0)
        yield leader
        changes = counter("leader_changes", "Times the elected leader changed in this node's view")
        changes.add_metric(values, node.leader_changes)
        yield changes
        score = gauge("uplink_score", "This node's uplink score (0-100)")
        score.add_metric(values, (status or {}).get("uplink_score", 0))
        yield score

        # Sync and transport.
        errors = counter("sync_errors", "Failed sync work, by kind", ("kind",))
        for key in ("peer_errors", "sync_requests_refused"):
            errors.add_metric([*values, key], node.counters.get(key, 0))
        if forwarder is not None:
            errors.add_metric([*values, "cloud_batch_failures"], forwarder.counters.failures)
            errors.add_metric([*values, "cloud_documents_deferred"], forwarder.counters.deferred)
        yield errors
        codes, received, failed = _dispatcher_counts(node.transport)
        coap = counter("coap_requests", "CoAP requests this node answered, by response code class or code", ("code",))
        coap.add_metric([*values, "2.xx"], max(0, received - failed))
        for code, n in sorted(codes.items()):
            coap.add_metric([*values, code], n)
        yield coap
        refusals = counter("refusals", "Requests refused by the sealed transport, by reason", ("reason",))
        refused: Counter[str] = Counter()
        for source in (getattr(node.transport, "refused", None), getattr(node.sealer, "refused", None)):
            if source:
                refused.update(source)
        for reason, n in sorted(refused.items()):
            refusals.add_metric([*values, reason], n)
        yield refusals
        docs = gauge("documents", "Session documents in active gossip")
        docs.add_metric(values, len(node.replica.docs) - (SITE_CONFIG_ID in node.replica.docs))
        yield docs

    def _status(self) -> dict[str, Any] | None:
        if self.node.membership is None:
            return None  # not serving yet
        try:
            return self.node.status_json()
        except Exception:
            log.warning("status for metrics failed", exc_info=True)
            return None

    def _event_count(self, doc_id: str) -> int:
        try:
            data, _ = self.node.fold(doc_id)
        except Exception:
            return 0
        return len(data.events)


class NodeMetrics:
    """A node's registry: the collector above plus the stop-to-receipt histogram.

    The histogram observes, for a session that turns `reconciled` while this node
    runs, the seconds from its `stop` event to the moment the receipt reached this
    node (the node's wall clock; sessions already reconciled at start are skipped).
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self._registry: CollectorRegistry | None = None
        self._counts = [0] * (len(RECONCILE_BUCKETS) + 1)
        """Observations per bucket (not cumulative); the last is above every bound (+Inf)."""
        self._sum = 0.0
        self._reconciled: set[str] = set()
        self._primed = False
        node.change_listeners.append(self._on_change)

    @property
    def registry(self) -> CollectorRegistry:
        """The registry to expose, made (and prometheus_client imported) on first use."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry(auto_describe=False)
            registry.register(NodeCollector(self.node))  # type: ignore[arg-type]
            registry.register(_ReconcileCollector(self))  # type: ignore[arg-type]
            self._registry = registry
        return self._registry

    def observe(self, seconds: float) -> None:
        """One stop-to-receipt time, in the first bucket whose bound holds it."""
        self._sum += seconds
        self._counts[bisect.bisect_left(RECONCILE_BUCKETS, seconds)] += 1

    def _prime(self, changed: str) -> None:
        """Sessions already reconciled before the first change seen are not timed."""
        self._primed = True
        for doc_id in list(self.node.replica.docs):
            if doc_id != changed:
                self._state(doc_id, observe=False)

    def _on_change(self, doc_id: str) -> None:
        if not self._primed:
            self._prime(doc_id)
        self._state(doc_id, observe=True)

    def _state(self, doc_id: str, *, observe: bool) -> None:
        if doc_id == SITE_CONFIG_ID or doc_id in self._reconciled:
            return
        try:
            _, view = self.node.fold(doc_id)
        except Exception:
            return
        if view.state != "reconciled":
            return
        self._reconciled.add(doc_id)
        if observe and view.stopped_ts is not None:
            seconds = (self.node.wall_clock() * 1000 - view.stopped_ts) / 1000
            self.observe(max(0.0, seconds))


class _ReconcileCollector:
    """`NodeMetrics`' stop-to-receipt counts as a Prometheus histogram, at scrape time."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        counts, total, buckets = self.metrics._counts, 0, []
        for bound, count in zip((*RECONCILE_BUCKETS, float("inf")), counts, strict=True):
            total += count
            buckets.append((floatToGoString(bound), total))
        yield HistogramMetricFamily(
            PREFIX + "reconcile_seconds",
            "Seconds from a session's stop to its cloud receipt arriving at this node",
            buckets=buckets,
            sum_value=self.metrics._sum,
        )
