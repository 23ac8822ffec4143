"""Uplink probe, forwarder to the cloud, and the reference reconciliation service.

This package imports `crdt` only, never `meshnode` or `sim`.
"""

from typing import TYPE_CHECKING

from ._apiauth import (
    API_READ_TOKEN,
    API_TOKEN,
    MAX_JSON_DEPTH,
    READ,
    READ_METHODS,
    WRITE,
    ApiGuard,
    ApiTokens,
    BodyTooLarge,
    TokenFileError,
    json_depth_ok,
    read_token_file,
)
from ._cloudauth import cloud_token_dir, load_cloud_tokens
from ._forwarder import (
    CLOUD_PEER,
    PRIORITY_METER,
    PRIORITY_STATE,
    SIGNED_SYNC_CONTEXT,
    DeviceCredential,
    ForwardCounters,
    Forwarder,
    ForwardPlanner,
    SignedSyncRequest,
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
from ._tariffs import (
    NO_TARIFF,
    OperatorConfig,
    Priced,
    Tariff,
    TariffEntryError,
    is_tariff_entry,
    make_tariff_entry,
    price_session,
    select_tariff,
    site_tariffs,
    verify_tariff_entry,
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

if TYPE_CHECKING:
    from ._cloud import (
        DEFAULT_PORT,
        ChainLink,
        ChainVerdict,
        CloudError,
        CloudKeyError,
        CloudService,
        ReceiptError,
        RemoteRequestError,
        check_chains,
        create_cloud_app,
        default_key_path,
        load_or_create_cloud_key,
        make_receipt,
        open_cloud,
        serve_cloud,
        verify_receipt,
    )
    from ._ledger import Ledger, LedgerError, LedgerUrlError
    from ._tokenauth import DataDirTokens

# The reference cloud service and its ledger are imported on first use: a node
# (which only forwards) never loads the service, its ledger or a database driver.
_LAZY = {
    **dict.fromkeys(
        (
            "DEFAULT_PORT", "ChainLink", "ChainVerdict", "CloudError", "CloudKeyError", "CloudService",
            "ReceiptError", "RemoteRequestError", "check_chains", "create_cloud_app",
            "default_key_path", "load_or_create_cloud_key", "make_receipt", "open_cloud", "serve_cloud",
            "verify_receipt",
        ),
        "._cloud",
    ),
    **dict.fromkeys(("Ledger", "LedgerError", "LedgerUrlError"), "._ledger"),
    "DataDirTokens": "._tokenauth",  # httpx: not for a node without an uplink
}  # fmt: skip


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "API_READ_TOKEN",
    "API_TOKEN",
    "MAX_JSON_DEPTH",
    "READ",
    "READ_METHODS",
    "WRITE",
    "ApiGuard",
    "ApiTokens",
    "BodyTooLarge",
    "DataDirTokens",
    "TokenFileError",
    "json_depth_ok",
    "read_token_file",
    "cloud_token_dir",
    "load_cloud_tokens",
    "CLOUD_PEER",
    "DEFAULT_PORT",
    "MAX_BATCH_BYTES",
    "NO_TARIFF",
    "PRIORITY_METER",
    "PRIORITY_STATE",
    "SIGNED_SYNC_CONTEXT",
    "SYNC_PATH",
    "ChainLink",
    "ChainVerdict",
    "CloudBadResponse",
    "CloudClient",
    "CloudError",
    "CloudKeyError",
    "CloudRefused",
    "CloudService",
    "CloudSyncRequest",
    "CloudSyncResponse",
    "CloudTimeout",
    "CloudUnreachable",
    "DeviceCredential",
    "ForwardCounters",
    "ForwardPlanner",
    "Forwarder",
    "Ledger",
    "LedgerError",
    "LedgerUrlError",
    "ReceiptError",
    "RemoteRequestError",
    "SignedSyncRequest",
    "OperatorConfig",
    "Priced",
    "Tariff",
    "TariffEntryError",
    "UplinkError",
    "UplinkScorer",
    "WireError",
    "change_priority",
    "check_chains",
    "compress",
    "create_cloud_app",
    "decompress",
    "is_tariff_entry",
    "make_tariff_entry",
    "price_session",
    "select_tariff",
    "site_tariffs",
    "verify_tariff_entry",
    "default_key_path",
    "latency_factor",
    "load_or_create_cloud_key",
    "make_receipt",
    "open_cloud",
    "receipt_body",
    "serve_cloud",
    "serve_forwarder",
    "serve_probe",
    "verify_receipt",
]  # fmt: skip
