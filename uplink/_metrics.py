"""Prometheus metrics of the cloud service (`GET /metrics`), read at scrape time.

The ledger already counts what finance and on-call ask about (rows, receipts,
conflicts, refused messages, bytes); `CloudCollector` reads those counters when
Prometheus scrapes. Ingest latency and the number of session documents ingested
are measured in the sync handler (`CloudMetrics.observe_sync`), in a registry of
this service's own (several services may run in one test process).

Reviews pending: a session waits for a person when its ledger row is flagged
(`review`: a driver authorised offline on the site's policy) or has conflicts,
and no decision on it is recorded (see docs/metrics.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._ledger import LedgerError

if TYPE_CHECKING:
    from ._cloud import CloudService

log = logging.getLogger("uplink.metrics")

PREFIX = "meshnode_cloud_"
INGEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

_COUNTERS = {
    "requests": "Sync requests accepted (decoded) from leaders",
    "messages": "Sync messages received",
    "messages_refused": "Sync messages refused (the document was not changed)",
    "duplicates_rejected": "Sync messages that carried only changes the cloud already held",
    "bytes_received": "Request bytes received (compressed)",
    "bytes_received_inflated": "Request bytes received (inflated)",
}
_GAUGES = {
    "ledger_rows": ("sessions", "Rows in the ledger (one per session)"),
    "receipts": ("receipts", "Sessions with a signed receipt"),
    "events": ("events", "Distinct verified events stored"),
    "conflicts": ("conflicts", "Conflicts recorded"),
}


def pending_reviews(cloud: CloudService) -> int:
    """Sessions flagged for a person (offline authorisation, conflicts, unpriced) with no decision yet."""
    with cloud.ledger.read() as tx:
        rows = tx.query(
            "SELECT count(*) AS n FROM ledger WHERE review IS NOT NULL OR conflicts > 0 "
            "OR (cost_cents IS NULL AND state IN ('completed', 'reconciled'))"
        )
    return int(rows[0]["n"])


class CloudCollector(Collector):
    def __init__(self, cloud: CloudService) -> None:
        self.cloud = cloud

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.cloud.stats()
            pending = pending_reviews(self.cloud)
        except LedgerError as exc:
            log.error("metrics: the database does not answer: %s", exc)
            up = GaugeMetricFamily(PREFIX + "database_up", "1 when the ledger answered this scrape")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily(PREFIX + "database_up", "1 when the ledger answered this scrape")
        up.add_metric([], 1)
        yield up
        for name, doc in _COUNTERS.items():
            c = CounterMetricFamily(PREFIX + name, doc)
            c.add_metric([], stats.get(name, 0))
            yield c
        for name, (key, doc) in _GAUGES.items():
            g = GaugeMetricFamily(PREFIX + name, doc)
            g.add_metric([], stats.get(key, 0))
            yield g
        g = GaugeMetricFamily(PREFIX + "reviews_pending", "Sessions waiting for a person's decision")
        g.add_metric([], pending)
        yield g


class CloudMetrics:
    """The service's registry: the collector above plus what the sync handler measures."""

    def __init__(self, cloud: CloudService) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(CloudCollector(cloud))
        self.ingest_seconds = Histogram(
            PREFIX + "ingest_seconds",
            "Seconds to apply one sync request (decode, verify, fold, commit), answered requests only",
            buckets=INGEST_BUCKETS,
            registry=self.registry,
        )
        self.sessions_ingested = Counter(
            PREFIX + "sessions_ingested",
            "Session documents changed by sync requests and committed to the ledger",
            registry=self.registry,
        )

    def observe_sync(self, seconds: float, documents: int) -> None:
        self.ingest_seconds.observe(seconds)
        self.sessions_ingested.inc(documents)
