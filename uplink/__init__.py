"""Uplink probe, forwarder to the cloud, and the reference reconciliation service.

This package imports `crdt` only, never `meshnode` or `sim`.
"""

from ._forwarder import (
    CLOUD_PEER,
    PRIORITY_METER,
    PRIORITY_STATE,
    ForwardCounters,
    Forwarder,
    ForwardPlanner,
    change_priority,
    serve_forwarder,
)
from ._probe import (
    CloudBadResponse,
    CloudClient,
    CloudRefused,
    CloudTimeout,
    CloudUnreachable,
    UplinkError,
    UplinkScorer,
    latency_factor,
    serve_probe,
)
from ._wire import (
    MAX_BATCH_BYTES,
    SYNC_PATH,
    CloudSyncRequest,
    CloudSyncResponse,
    WireError,
    compress,
    decompress,
    receipt_body,
)

__all__ = [name for name in dir() if not name.startswith("_")]
