"""Uplink probe, forwarder to the cloud, and the reference reconciliation service.

This package imports `crdt` only, never `meshnode` or `sim`.
"""

from ._cloud import (
    DEFAULT_PORT,
    ChainLink,
    ChainVerdict,
    CloudError,
    CloudKeyError,
    CloudService,
    ReceiptError,
    RemoteRequestError,
    TariffError,
    check_chains,
    create_cloud_app,
    default_key_path,
    load_or_create_cloud_key,
    make_receipt,
    open_cloud,
    serve_cloud,
    session_cost,
    verify_receipt,
)
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
from ._ledger import Ledger, LedgerError, LedgerUrlError
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
