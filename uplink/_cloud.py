"""The reference cloud reconciliation service: sync in, billing ledger and receipts out.

The leader of a site posts batched Automerge sync messages (`_wire.py`); the
cloud is one more sync peer that holds a replica of every session document,
plus a SQL ledger (`_ledger.py`) with exactly one row per session. For every
document a request changed, in one database transaction *before* replying:

1. Keys: the service's `trusted_keys`, and (with `trust_document_keys`) the
   keys devices declare in the documents, pinned on first use: a later
   document that declares another key for a known device does not get it
   (conflict `key_mismatch`), so a node cannot re-key someone else's charger.
2. Events are verified; the valid ones that are new to the cloud go through the
   cross-session chain check (`check_chains`): a device's `seq` runs across
   all its sessions, so only the cloud, which sees them all, can find a fork
   (same device and seq, another event) or a broken link (`prev` is not the
   chain hash of the device's seq - 1) between sessions. The chain is
   first-come: the first event stored in a slot that links with its stored
   neighbours is accepted; a later event that contradicts it is refused, and
   so is an event that extends a refused one. Refused events stay in the
   `events` table (so a re-send decides nothing again) and in `conflicts`.
3. Billing folds only the accepted events (stored bytes, so an event deleted
   from the document later still counts and is reported `event_removed`):
   forged or chain-broken events never contribute energy or cost. Cost comes
   from the site's signed tariff valid at the session's start (`_tariffs.py`);
   without one the session is unpriced, never priced from a built-in number.
4. A completed session gets one receipt, signed with the cloud's Ed25519 key,
   written into the document with `crdt.set_receipt`; an unpriced one's receipt
   carries the energy and `priced: false`, no money. When the site's tariffs
   change, its unpriced sessions are priced again (the ledger row, not the receipt).
   The ledger holds the only receipt a session ever gets: a document that
   lost it, or carries another one, gets the ledger's back (`foreign_receipt`).
   After the receipt the billed amount is final; events that arrive later are
   stored as `late` and reported, never billed.

Idempotence: Automerge sync applies a change once, events and conflicts are
keyed by content, receipts by session; ingestion of a document is serialised by
a per-document `trio.Lock` and every database transaction by the ledger's lock.
So a re-sent batch, a second leader, or two leaders racing change nothing the
second time. Several service processes may share one PostgreSQL database: a
transaction locks its sessions and devices in the database and merges the
stored documents first (`CloudService._catch_up`).

Stats: `duplicates_rejected` counts sync messages that carried changes (a
non-empty change list) and applied cleanly yet added no change to the document:
all of it was already held (a re-sent batch, a stale sync state). Requests
refused as a whole (4xx) are not counted anywhere. See docs/cloud.md.

Pure decisions (`make_receipt`, `verify_receipt`,
`check_chains`, `session_keys`, `sync_message_carries_changes`) take values and
return values; the trio and HTTP glue around them is thin.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import cbor2
import nacl.exceptions
import nacl.signing
import trio
from automerge.core import Document
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from crdt import (
    SITE_CONFIG_ID,
    SessionData,
    Keyring,
    Replica,
    SyncSession,
    heads_hash,
    set_receipt,
)

from ._apiauth import ApiTokens
from ._cloud_web import cloud_pages
from ._cloudauth import SeenRequests, guard_cloud
from ._forwarder import SIGNED_SYNC_CONTEXT
from ._ingest import IngestRules, SessionReader, reconcile_batch, session_devices
from ._ingest import (  # noqa: F401  (the pure decisions of ingestion, long imported from this module)
    BROKEN_CHAIN,
    EVENT_REMOVED,
    FOREIGN_RECEIPT,
    FORK,
    KEY_MISMATCH,
    LATE,
    OK,
    ChainLink,
    ChainVerdict,
    SessionKeys,
    check_chains,
    session_keys,
)
from ._ledger import Ledger, LedgerError, Tx, parse_db_url
from ._metrics import CloudMetrics
from ._ocpi import ocpi_routes
from ._tariffs import OperatorConfig, PriceDecision, SiteConfigs, decide_price, split_site_config, with_site_config
from ._wire import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    MAX_INFLATED,
    RECEIPT_FIELDS,
    SYNC_PATH,
    CloudSyncRequest,
    CloudSyncResponse,
    WireError,
    compress,
    decompress,
    receipt_body,
)

log = logging.getLogger("uplink.cloud")


class _RefusalBudget(logging.Filter):
    """Anyone can send the cloud refusable requests as fast as the network carries them; a
    WARNING for each would fill its log first. At most one line per logger and message
    template per `interval` seconds, saying how many like it were held back (at most
    `max_keys` templates remembered); ERROR and above, and INFO, pass unchanged."""

    def __init__(self, interval: float = 10.0, max_keys: int = 256) -> None:
        super().__init__()
        self.interval, self.max_keys = interval, max_keys
        self._open_at: dict[tuple[str, str], float] = {}
        self._held: Counter[tuple[str, str]] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key, now = (record.name, str(record.msg)), time.monotonic()
        if now < self._open_at.get(key, -1.0):
            self._held[key] += 1
            return False
        self._open_at.pop(key, None)
        self._open_at[key] = now + self.interval
        if len(self._open_at) > self.max_keys:
            oldest = next(iter(self._open_at))
            del self._open_at[oldest]
            self._held.pop(oldest, None)
        if held := self._held.pop(key, 0):
            suffix = f" (and {held} more like it in the last {self.interval:.0f} s)"
            if isinstance(record.args, tuple):  # the template stays as it is, for whoever reads logs by it
                record.msg, record.args = f"{record.msg}%s", (*record.args, suffix)
            else:
                record.msg, record.args = record.getMessage() + suffix, None
        return True


REFUSAL_LOG = _RefusalBudget()
log.addFilter(REFUSAL_LOG)
logging.getLogger("uplink.ocpi").addFilter(REFUSAL_LOG)  # a wrong OCPI token, request after request

DEFAULT_PORT = 8700
BACKLOG = 2048
"""Listen backlog (Hypercorn's default, 100, resets connections under a burst)."""
MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_REPRICE = 2000
"""Unpriced sessions of a site priced again in the transaction that changes its config
(oldest first; the rest at its next config change): bounds that transaction."""
"""Largest compressed request body accepted (413 above it); inflation is bounded by MAX_INFLATED."""

# Counters kept in the `stats` table.
STAT_REQUESTS = "requests"
STAT_MESSAGES = "messages"
STAT_REFUSED = "messages_refused"
STAT_DUPLICATES = "duplicates_rejected"
STAT_BYTES = "bytes_received"
STAT_BYTES_INFLATED = "bytes_received_inflated"
_STAT_NAMES = (
    "sessions", "events", "conflicts", "receipts", STAT_DUPLICATES, STAT_BYTES, STAT_BYTES_INFLATED,
    STAT_REQUESTS, STAT_MESSAGES, STAT_REFUSED,
)  # fmt: skip


class CloudError(Exception):
    """Base of the errors this module raises on purpose."""


class RemoteRequestError(CloudError):
    """A client sent something unacceptable; answered with `status` and nothing changed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class CloudKeyError(CloudError):
    """The cloud's key file cannot be read or written (a local configuration problem)."""


class ReceiptError(ValueError):
    """A receipt does not parse or does not verify."""


# --- pure decisions ----------------------------------------------------------------


def make_receipt(
    *,
    session_id: str,
    energy_wh: int,
    cost_cents: int | None,
    currency: str | None,
    heads: Iterable[bytes],
    issued_ts: int,
    signing_key: nacl.signing.SigningKey,
    tariff: tuple[str, int] | None = None,
) -> bytes:
    """Build and sign a receipt; returns its canonical CBOR, as stored in the document.

    `heads` are the document's heads the cloud folded (sorted here), so anyone
    can check which changes the billed amount covers. `tariff` (id, version) names
    the tariff that priced it (fields `tariff_id`, `tariff_version`). An unpriced
    session (`cost_cents` None) gets a receipt without `cost_cents` and `currency`,
    with `priced: false`: it bills the energy and no money. The signature is
    Ed25519 over the canonical CBOR of every field but `sig` (`_signed_part`; for a
    receipt without tariff fields that is `receipt_body`).
    """
    receipt: dict[str, Any] = {
        "session_id": session_id,
        "energy_wh": int(energy_wh),
        "heads": sorted(bytes(h) for h in heads),
        "issued_ts": int(issued_ts),
        "issuer": bytes(signing_key.verify_key).hex(),
    }
    if cost_cents is None or currency is None:
        receipt["priced"] = False
    else:
        receipt["cost_cents"], receipt["currency"] = int(cost_cents), currency
    if tariff is not None and "priced" not in receipt:
        receipt["tariff_id"], receipt["tariff_version"] = str(tariff[0]), int(tariff[1])
    receipt["sig"] = signing_key.sign(_signed_part(receipt)).signature
    return cbor2.dumps(receipt, canonical=True)


def _signed_part(receipt: Mapping[str, Any]) -> bytes:
    """What a receipt's signature covers: every field but `sig` (== `receipt_body` without tariff fields)."""
    if set(receipt) - {"sig"} == set(RECEIPT_FIELDS):
        return receipt_body(receipt)
    return cbor2.dumps({k: v for k, v in receipt.items() if k != "sig"}, canonical=True)


_RECEIPT_TARIFF_FIELDS = {"tariff_id": str, "tariff_version": int}
_RECEIPT_PRICE_FIELDS = ("cost_cents", "currency")
_RECEIPT_TYPES: Mapping[str, type | tuple[type, ...]] = {
    "session_id": str, "energy_wh": int, "cost_cents": int, "currency": str, "heads": list,
    "issued_ts": int, "issuer": str, "sig": bytes,
}  # fmt: skip


def verify_receipt(blob: bytes, issuer: bytes | str | None = None) -> dict[str, Any]:
    """Parse a receipt and check its signature.

    Args:
        blob: the receipt's CBOR bytes (a session document's `receipt`).
        issuer: the cloud's public key (32 bytes or hex). When omitted, the
            key named in the receipt is used: that proves integrity, not origin.

    Returns:
        The receipt as a dict (heads as a list of bytes).

    Raises:
        ReceiptError: not CBOR, wrong shape, another issuer, or a bad signature.
    """
    if not isinstance(blob, bytes | bytearray):
        raise ReceiptError(f"a receipt is bytes, got {type(blob).__name__}")
    try:
        receipt = cbor2.loads(blob)
    except Exception as exc:  # cbor2 raises several types on bad input
        raise ReceiptError(f"receipt is not CBOR: {exc}") from exc
    base = {*RECEIPT_FIELDS, "sig"}
    unpriced = (base - set(_RECEIPT_PRICE_FIELDS)) | {"priced"}
    if not isinstance(receipt, dict) or set(receipt) not in (base, base | set(_RECEIPT_TARIFF_FIELDS), unpriced):
        raise ReceiptError(
            f"a receipt is a map of exactly {sorted(base)} (and optionally {sorted(_RECEIPT_TARIFF_FIELDS)}), "
            f"or of {sorted(unpriced)} for an unpriced session"
        )
    if "priced" in receipt and receipt["priced"] is not False:
        raise ReceiptError("receipt field 'priced' is only ever false")
    for name, kind in {**_RECEIPT_TYPES, **_RECEIPT_TARIFF_FIELDS}.items():
        if name not in receipt:
            continue
        if not isinstance(receipt[name], kind) or isinstance(receipt[name], bool):
            raise ReceiptError(f"receipt field {name!r} has type {type(receipt[name]).__name__}")
    if not all(isinstance(h, bytes) and len(h) == 32 for h in receipt["heads"]):
        raise ReceiptError("receipt heads must be 32-byte hashes")
    expected = issuer.hex() if isinstance(issuer, bytes | bytearray) else issuer
    if expected is not None and receipt["issuer"] != expected:
        raise ReceiptError(f"receipt was issued by {receipt['issuer']}, not {expected}")
    try:
        key = nacl.signing.VerifyKey(bytes.fromhex(receipt["issuer"]))
        key.verify(_signed_part(receipt), receipt["sig"])
    except (ValueError, nacl.exceptions.CryptoError) as exc:
        raise ReceiptError(f"receipt signature does not verify: {exc}") from exc
    return receipt


Authenticate = Callable[[bytes, float], "tuple[str, bytes]"]
"""`authenticate(certificate, now)` -> (device_id, public key) when `certificate` is one
the service trusts to forward for the site: signed by the site key, not revoked, a
role that may forward. Raises `RemoteRequestError` (401/403) otherwise. Supplied by the
caller like `Certify` (`meshnode cloud --site DIR`)."""

MAX_SYNC_SKEW = 900.0
"""Seconds a signed sync request's timestamp may be off the cloud's clock. A request is
idempotent (Automerge sync), so a replay inside the window could cost work, not money;
the service refuses it anyway (409: `SeenRequests`, uplink/_cloudauth.py)."""


def open_signed_sync(
    inflated: bytes, authenticate: Authenticate, now: float, seen: SeenRequests | None = None
) -> CloudSyncRequest:
    """Check a signed sync request (`uplink.SignedSyncRequest`) and return the request inside.

    Raises:
        RemoteRequestError: 401 when nothing proves a device of the site sent it
            (unsigned, malformed, unknown or forged certificate, bad signature, stale
            timestamp); 403 when a certified device may not do this (revoked, role,
            or the request speaks for another node); 400 for a bad inner request.
    """
    try:
        outer = cbor2.loads(inflated)
    except Exception as exc:  # cbor2 raises several types on bad input
        raise RemoteRequestError(400, f"sync request is not valid CBOR: {exc}") from exc
    if not isinstance(outer, dict) or "signed" not in outer:
        raise RemoteRequestError(401, "this cloud takes sync only from certified devices of its site: sign the request")
    signed, cert, sig = outer.get("signed"), outer.get("cert"), outer.get("sig")
    if (
        outer.get("v") != 1
        or not isinstance(signed, bytes)
        or not isinstance(cert, bytes)
        or not isinstance(sig, bytes)
        or len(sig) != 64
    ):
        raise RemoteRequestError(401, "signed sync request has the wrong shape")
    device_id, public_key = authenticate(cert, now)
    try:
        nacl.signing.VerifyKey(public_key).verify(SIGNED_SYNC_CONTEXT + signed, sig)
    except (ValueError, nacl.exceptions.CryptoError) as exc:
        raise RemoteRequestError(401, "sync request signature does not verify") from exc
    inner = cbor2.loads(signed)  # signed by a certified device: well-formed CBOR of ours
    ts = inner.get("ts") if isinstance(inner, dict) else None
    if not isinstance(ts, int | float) or isinstance(ts, bool) or abs(ts - now) > MAX_SYNC_SKEW:
        raise RemoteRequestError(401, f"sync request timestamp is more than {MAX_SYNC_SKEW:g} s off the cloud's clock")
    try:
        request = CloudSyncRequest.decode(inner["req"])
    except (WireError, KeyError, TypeError) as exc:
        raise RemoteRequestError(400, f"signed sync request: {exc}") from exc
    if request.node_id != device_id:
        raise RemoteRequestError(403, f"device {device_id!r} may not sync as {request.node_id!r}")
    if seen is not None and not seen.first_sight(sig, float(ts), now):  # uplink/_cloudauth.py
        raise RemoteRequestError(409, "this signed sync request was taken before: a replay changes nothing")
    return request


SiteEntry = Callable[[bytes], "dict[str, str]"]
"""`site_entry(entry)` keeps a site-signed revocation the cloud is handed (`POST
/v1/site/entries`, the node API's route and body); raises `RemoteRequestError`(400)
for anything else. The entry is its own credential: the site key signed it."""

Certify = Callable[[str, bytes], "bytes | None"]
"""`certify(device_id, declared)` -> the device's public key if `declared` (from a
session's `devices` map) is a certificate the service trusts for that device, else
None. The caller supplies it (the cloud cannot import `meshnode`, where
certificates live); `meshnode cloud --site DIR` builds it from the site's key."""


def sync_message_carries_changes(data: bytes) -> bool:
    """Whether an Automerge sync message carries at least one change.

    Layout (automerge binary format, sync message v1 0x42 and v2 0x43): the
    type byte; `heads` and `need` (LEB128 count, then 32-byte hashes); `have`
    (LEB128 count, each a hash list and a LEB128-length bloom filter); then the
    LEB128 count of the change chunks. Used only for the `duplicates_rejected`
    counter; a message it cannot read counts as carrying none.
    """
    try:
        if data[0] not in (0x42, 0x43):
            return False
        pos = 1
        for _ in range(2):
            count, pos = _leb128(data, pos)
            pos += 32 * count
        haves, pos = _leb128(data, pos)
        for _ in range(haves):
            count, pos = _leb128(data, pos)
            pos += 32 * count
            length, pos = _leb128(data, pos)
            pos += length
        changes, pos = _leb128(data, pos)
        return changes > 0 and pos <= len(data)
    except IndexError:
        return False


def _leb128(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80 or shift > 63:
            return value, pos


# --- keys --------------------------------------------------------------------------


def default_key_path(db_url: str) -> Path:
    """Where the cloud keeps its signing key unless told: next to an SQLite file, else ./cloud.key."""
    backend, target = parse_db_url(db_url)
    if backend == "sqlite" and target != ":memory:":
        return Path(target + ".key")
    return Path("cloud.key")


def load_or_create_cloud_key(path: str | os.PathLike[str]) -> nacl.signing.SigningKey:
    """Load the cloud's Ed25519 signing key, creating it (mode 0600) on first start.

    The file holds the 32-byte seed in hex. Losing it means later receipts are
    signed by another key; nodes keep the old receipts, which still verify.

    Raises:
        CloudKeyError: the file cannot be read, created or parsed.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            text = path.read_text().strip()
            mode = path.stat().st_mode
        except OSError as exc:
            raise CloudKeyError(f"cannot read cloud key {path}: {exc}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("cloud key %s is readable by group or others (mode %o)", path, mode & 0o777)
        try:
            seed = bytes.fromhex(text)
        except ValueError as exc:
            raise CloudKeyError(f"cloud key {path} is not a hex seed") from exc
        if len(seed) != 32:
            raise CloudKeyError(f"cloud key {path} must hold 32 bytes, got {len(seed)}") from None
        return nacl.signing.SigningKey(seed)
    except OSError as exc:
        raise CloudKeyError(f"cannot create cloud key {path}: {exc}") from exc
    key = nacl.signing.SigningKey.generate()
    try:
        with os.fdopen(fd, "w") as f:
            f.write(bytes(key).hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise CloudKeyError(f"cannot write cloud key {path}: {exc}") from exc
    log.info("created cloud signing key %s (public %s)", path, bytes(key.verify_key).hex())
    return key


# --- the service -------------------------------------------------------------------


RunSync = Callable[..., Awaitable[Any]]
"""Runs blocking work: `await run_sync(fn, *args)` returns `fn(*args)`."""


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


class CloudService:
    """The reconciliation service over an open ledger. Get one from `open_cloud`.

    Attributes:
        app: the Starlette application (routes below), ready to serve.
        replica: the cloud's replica of every session document.
        issuer: hex of the public key receipts are signed with.
    """

    def __init__(
        self,
        ledger: Ledger,
        docs: Mapping[str, Document],
        *,
        signing_key: nacl.signing.SigningKey,
        trusted_keys: Mapping[str, bytes] | None,
        trust_document_keys: bool,
        wall_clock: Callable[[], float],
        certify: Certify | None = None,
        operator: OperatorConfig | None = None,
        authenticate: Authenticate | None = None,
        site_entry: SiteEntry | None = None,
        run_sync: RunSync | None = None,
        actor_for: Callable[[str], bytes] | None = None,
    ) -> None:
        self.ledger = ledger
        self.operator = operator or OperatorConfig()
        self.site_configs = SiteConfigs(self.operator.site_keys)
        with ledger.read() as tx:
            self.site_configs.load(tx.site_configs())
        self._certify = certify
        self._authenticate = authenticate
        self._seen = SeenRequests(MAX_SYNC_SKEW)  # signed requests already taken (replays)
        self.site_entry = site_entry
        self.run_sync: RunSync = run_sync or _in_thread
        self._actor_for = actor_for
        self.replica = Replica(docs, change_bytes=False)  # the cloud saves documents, not changes
        self._key = signing_key
        self._trusted = {d: bytes(k) for d, k in (trusted_keys or {}).items()}
        Keyring(self._trusted)  # raises LocalError now for a key that is not 32 bytes
        self._trust_document_keys = trust_document_keys
        self._wall_clock = wall_clock
        self._locks: dict[str, trio.Lock] = {}
        # heads_hash of each document as this process last stored or loaded it: a stored
        # document with other heads was written by another process (see `_catch_up`).
        self._known_heads: dict[str, bytes] = self.replica.heads_hashes()
        self.issuer = bytes(signing_key.verify_key).hex()
        self.metrics = CloudMetrics(self)
        self.app = _build_app(lambda _request: self)

    # --- POST /v1/sync -------------------------------------------------------------

    async def handle_sync(self, body: bytes, content_encoding: str | None) -> bytes:
        """Apply one batch and return the deflated CBOR reply.

        Raises:
            RemoteRequestError: the body is unacceptable (nothing changed).
            LedgerError: the database failed; in-memory documents were restored
                to what the database holds, so nothing changed either.
        """
        if (content_encoding or "").strip().lower() != CONTENT_ENCODING:
            raise RemoteRequestError(415, f"Content-Encoding must be {CONTENT_ENCODING}")
        try:
            inflated = decompress(body, MAX_INFLATED)
            if self._authenticate is not None:
                request = open_signed_sync(inflated, self._authenticate, self._wall_clock(), self._seen)
            else:
                request = CloudSyncRequest.decode(inflated)
        except WireError as exc:
            raise RemoteRequestError(400, str(exc)) from exc
        node = request.node_id
        started = time.perf_counter()
        request, site_msg = split_site_config(request)
        delta: Counter[str] = Counter({STAT_REQUESTS: 1, STAT_BYTES: len(body), STAT_BYTES_INFLATED: len(inflated)})
        # The responder side of `crdt.SyncSession`, the same exchange the forwarder runs.
        reader = SessionReader()  # each session read once per version in this request
        session = SyncSession(self.replica, node, validate=reader.check, check_changed=reader.check)
        async with self._locked(set(request.msgs) | set(request.reset) | {f"{SITE_CONFIG_ID}:{request.site}"}):
            # Shielded: in-memory documents and the database must not part ways
            # half-way; every blocking call inside is bounded by the DB timeouts.
            with trio.CancelScope(shield=True):
                site_saved = self.site_configs.saved(request.site) if site_msg else None
                site = self.site_configs.on_request(request.site, node, *site_msg) if site_msg else None
                applied = session.on_request(request.msgs, request.reset)
                if applied.damaged:  # a message that made a session stop being one
                    await self._restore(node, {d: self.replica.docs[d] for d in applied.damaged}, set())
                errors = applied.errors
                for doc_id, error in sorted(errors.items()):
                    log.warning("node %r: refused sync message for %r: %s", node, doc_id, error)
                delta[STAT_MESSAGES] += sum(1 for m in request.msgs.values() if m is not None)
                delta[STAT_REFUSED] += len(errors)
                delta[STAT_DUPLICATES] += sum(
                    1 for d in applied.unchanged if sync_message_carries_changes(request.msgs[d] or b"")
                )
                changed = {d: self.replica.docs[d] for d, _ in applied.changes}
                now = int(self._wall_clock() * 1000)
                try:
                    issued = await self.run_sync(
                        self._commit,
                        changed,
                        delta,
                        now,
                        request.site if site and site.changed else None,
                        list(request.msgs),
                        reader,
                    )
                except Exception:
                    # Re-priced sessions may have had a receipt set in memory too.
                    requested = {d: self.replica.docs[d] for d in request.msgs if d in self.replica.docs}
                    await self._restore(node, {**requested, **changed}, applied.created)
                    if site_msg:
                        self.site_configs.restore(request.site, site_saved)
                    raise
                for doc_id in issued:
                    log.info("issued receipt for session %r", doc_id)
                replies = session.replies(request.msgs, errors)
                if site is not None:
                    errors, replies = with_site_config(site, errors, replies)
                self.metrics.observe_sync(time.perf_counter() - started, len(changed))
        return compress(CloudSyncResponse(replies, errors).encode())

    @asynccontextmanager
    async def _locked(self, doc_ids: Iterable[str]) -> AsyncIterator[None]:
        """Hold the locks of several documents, taken in sorted order (no deadlock)."""
        async with AsyncExitStack() as stack:
            for doc_id in sorted(doc_ids):
                await stack.enter_async_context(self._locks.setdefault(doc_id, trio.Lock()))
            yield

    async def _restore(self, node: str, docs: Mapping[str, Document], created: set[str]) -> None:
        """Put documents back to what the database holds (after a refusal or a failed commit)."""
        for doc_id in docs:
            self.replica.book.forget_doc(doc_id)
            if doc_id in created:
                self.replica.docs.pop(doc_id, None)
                continue
            try:
                saved = await self.run_sync(self._load_saved, doc_id)
            except LedgerError as exc:
                log.error("cannot reload %r after a failure (%s); dropping it from memory", doc_id, exc)
                saved = None
            if saved is None:
                self.replica.docs.pop(doc_id, None)
            else:
                self.replica.docs[doc_id] = Document.load(saved)

    def _load_saved(self, doc_id: str) -> bytes | None:
        with self.ledger.read() as tx:
            return tx.document(doc_id)

    # --- reconciliation (worker thread, inside one transaction) ---------------------

    def _commit(
        self,
        changed: Mapping[str, Document],
        delta: Mapping[str, int],
        now: int,
        site: str | None = None,
        requested: Sequence[str] = (),
        reader: SessionReader | None = None,
    ) -> list[str]:
        """Reconcile changed documents in one transaction; also save a site config the
        request changed (`site`), and re-price requested sessions still unpriced.
        The reconciliation is one batch for all of them (`_ingest.reconcile_batch`)."""
        read = reader or SessionReader()
        with self.ledger.transaction() as tx:
            changed = dict(changed)
            if site is not None and self.site_configs.tariffs(site):
                # The site's tariffs may have changed: price its unpriced sessions again
                # (locked and caught up with the rest, in case another instance holds them).
                for doc_id in tx.unpriced_of_site(site, MAX_REPRICE):
                    if doc_id not in changed and doc_id in self.replica.docs:
                        changed[doc_id] = self.replica.docs[doc_id]
            changed = self._catch_up(tx, changed, requested, read)
            if site is not None and (saved := self.site_configs.saved(site)) is not None:
                tx.save_site_config(site, saved, now)
            changed = dict(changed)
            for doc_id in tx.unpriced(d for d in requested if d not in changed and d in self.replica.docs):
                changed[doc_id] = self.replica.docs[doc_id]
            outcome = reconcile_batch(tx, changed, now, self._ingest_rules(), read, self._known_heads)
            tx.add_stats(delta)
        self._known_heads.update(outcome.saved)
        return outcome.issued

    def _ingest_rules(self) -> IngestRules:
        def price(data: SessionData, applied: Sequence[tuple[str, int, int | None]], energy_wh: int) -> PriceDecision:
            return decide_price(self.site_configs.tariffs(data.site), data.tariff, applied, energy_wh)

        return IngestRules(
            trusted=self._trusted,
            certify=self._certify,
            trust_document_keys=self._trust_document_keys,
            price=price,
            issue=functools.partial(make_receipt, signing_key=self._key),
            write_receipt=self._write_receipt,
        )

    def _catch_up(
        self, tx: Tx, changed: dict[str, Document], requested: Sequence[str], read: SessionReader
    ) -> dict[str, Document]:
        """Make this transaction the only one reconciling these sessions, in any process,
        and start it from what the database holds.

        Several instances may share one database. First every session the request
        names and every device of the changed documents is locked (`Tx.lock_keys`,
        until COMMIT). Then a stored document this process did not write itself
        (its stored heads are not the ones it last saw) is merged into the one in
        memory: a receipt another instance issued is then in the document and in
        the ledger row, and is reused, never issued again.
        """
        if self.ledger.backend == "postgresql":
            docs = {d: self.replica.docs[d] for d in {*changed, *requested} if d in self.replica.docs}
            devices = {d for doc_id, doc in docs.items() for d in session_devices(read(doc_id, doc))}
            tx.lock_keys([f"session:{d}" for d in docs] + [f"device:{d}" for d in devices])
        for doc_id, stored in tx.document_heads(changed).items():
            if stored == self._known_heads.get(doc_id) or stored == heads_hash(changed[doc_id].get_heads()):
                continue
            blob = tx.document(doc_id)
            if blob is not None:
                changed[doc_id].merge(Document.load(blob))
                self._known_heads[doc_id] = stored
        return changed

    def _write_receipt(self, doc_id: str, doc: Document, receipt: bytes) -> None:
        """The one change the service authors in a document; with `actor_for` its
        actor is the seam's, not a random one (a seeded simulation stays reproducible)."""
        if self._actor_for is not None:
            doc.set_actor(self._actor_for(doc_id))
        set_receipt(doc, receipt)

    # --- reads -----------------------------------------------------------------------

    def sessions(self, site: str | None = None) -> list[dict[str, Any]]:
        with self.ledger.read() as tx:
            return [_row_json(r) for r in tx.ledger_rows(site)]

    def session(self, session_id: str) -> dict[str, Any] | None:
        with self.ledger.read() as tx:
            row = tx.ledger_row(session_id)
            if row is None:
                return None
            events = [
                {k: v for k, v in e.items() if k != "data"} | {"applied": bool(e["applied"])}
                for e in tx.session_events(session_id)
            ]
            return {"session": _row_json(row), "events": events, "conflicts": tx.conflicts(session_id)}

    def conflicts(self, session_id: str | None = None) -> list[dict[str, Any]]:
        with self.ledger.read() as tx:
            return tx.conflicts(session_id)

    def stats(self) -> dict[str, int]:
        with self.ledger.read() as tx:
            got = tx.stats()
        return {name: got.get(name, 0) for name in _STAT_NAMES}


def _row_json(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["receipt"] = row["receipt"].hex() if row["receipt"] is not None else None
    out["receipt_heads"] = row["receipt_heads"].split(",") if row["receipt_heads"] else []
    return out


# --- HTTP --------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RemoteRequestError(413, f"request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RemoteRequestError(413, f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _build_app(resolve: Callable[[Request], CloudService], lifespan: Any = None) -> Starlette:
    """The routes; `resolve` finds the service (fixed, or set up by a lifespan)."""

    async def sync(request: Request) -> Response:
        cloud = resolve(request)
        client = request.client.host if request.client else "?"
        try:
            body = await _read_body(request, MAX_REQUEST_BYTES)
            reply = await cloud.handle_sync(body, request.headers.get("content-encoding"))
        except RemoteRequestError as exc:
            log.warning("refused sync request from %s: %s", client, exc.message)
            return _error(exc.status, exc.message)
        except LedgerError as exc:
            log.error("sync request from %s failed in the database: %s", client, exc)
            return _error(503, f"database failure: {exc}")
        except Exception as exc:
            log.exception("sync request from %s failed", client)
            return _error(500, f"internal error: {type(exc).__name__}")
        return Response(reply, media_type=CONTENT_TYPE, headers={"Content-Encoding": CONTENT_ENCODING})

    async def read(request: Request, fn: Callable[..., Any], *args: Any) -> Any:
        return await resolve(request).run_sync(fn, *args)

    async def list_sessions(request: Request) -> Response:
        site = request.query_params.get("site")
        return JSONResponse({"sessions": await read(request, resolve(request).sessions, site)})

    async def get_session(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        found = await read(request, resolve(request).session, session_id)
        if found is None:
            return _error(404, f"no session {session_id!r}")
        return JSONResponse(found)

    async def list_conflicts(request: Request) -> Response:
        session_id = request.query_params.get("session_id")
        return JSONResponse({"conflicts": await read(request, resolve(request).conflicts, session_id)})

    async def stats(request: Request) -> Response:
        return JSONResponse(await read(request, resolve(request).stats))

    async def metrics(request: Request) -> Response:
        registry = resolve(request).metrics.registry
        return Response(await read(request, generate_latest, registry), media_type=CONTENT_TYPE_LATEST)

    async def issuer(request: Request) -> Response:
        return JSONResponse({"issuer": resolve(request).issuer})

    async def site_entries(request: Request) -> Response:
        cloud = resolve(request)
        if cloud.site_entry is None:
            return _error(404, "this cloud trusts no site (meshnode cloud --site DIR)")
        try:
            body = await _read_body(request, 64 * 1024)
            obj = json.loads(body)
            entry = bytes.fromhex(obj["entry"]) if isinstance(obj, dict) and isinstance(obj.get("entry"), str) else b""
            if not entry:
                raise RemoteRequestError(400, 'body must be {"entry": HEX}, a site-signed revocation')
            return JSONResponse(await cloud.run_sync(cloud.site_entry, entry), status_code=201)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested JSON
            return _error(400, f'body must be {{"entry": HEX}}: {type(exc).__name__}')
        except RemoteRequestError as exc:
            return _error(exc.status, exc.message)

    async def healthz(request: Request) -> Response:
        try:
            await read(request, resolve(request).ledger.ping)
        except LedgerError as exc:
            log.error("health check: database does not answer: %s", exc)
            return JSONResponse({"ok": False, "error": str(exc)}, status_code=503)
        return JSONResponse({"ok": True})

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))  # 404, 405: JSON like every other answer

    async def on_ledger_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed in the database: %s", request.method, request.url.path, exc)
        return _error(503, f"database failure: {exc}")

    pages = cloud_pages(resolve)  # the operator page: GET /, /assets, /v1/page/..., /v1/reviews
    return Starlette(
        routes=[
            Route(SYNC_PATH, sync, methods=["POST"]),
            Route("/v1/sessions", list_sessions, methods=["GET"]),
            Route("/v1/sessions/{session_id}", get_session, methods=["GET"]),
            Route("/v1/conflicts", list_conflicts, methods=["GET"]),
            Route("/v1/stats", stats, methods=["GET"]),
            Route("/v1/issuer", issuer, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            *pages.routes,
            Route("/metrics", metrics, methods=["GET"]),
            *ocpi_routes(resolve),
            Route("/v1/site/entries", site_entries, methods=["POST"]),
        ],
        middleware=pages.middleware,
        exception_handlers={LedgerError: on_ledger_error, HTTPException: on_http_error},
        lifespan=lifespan,
    )


# --- lifecycle ---------------------------------------------------------------------


def _open_ledger(db_url: str) -> tuple[Ledger, dict[str, Document]]:
    ledger = Ledger(db_url)
    try:
        with ledger.read() as tx:
            saved = tx.documents()
        docs = {}
        for doc_id, data in saved:
            try:
                docs[doc_id] = Document.load(data)
            except Exception as exc:  # the binding raises plain Exception
                raise LedgerError(f"stored document {doc_id!r} does not load: {exc}") from exc
    except BaseException:
        ledger.close()
        raise
    return ledger, docs


@asynccontextmanager
async def open_cloud(
    db_url: str,
    *,
    signing_key: nacl.signing.SigningKey,
    trusted_keys: Mapping[str, bytes] | None = None,
    trust_document_keys: bool = True,
    certify: Certify | None = None,
    authenticate: Authenticate | None = None,
    site_entry: SiteEntry | None = None,
    wall_clock: Callable[[], float] = time.time,
    operator: OperatorConfig | None = None,
    run_sync: RunSync | None = None,
    actor_for: Callable[[str], bytes] | None = None,
) -> AsyncIterator[CloudService]:
    """Open the database, load every session document, and hand out the service.

    Args:
        db_url: `sqlite:///path.db` or `postgresql://...`.
        signing_key: the cloud's Ed25519 key (see `load_or_create_cloud_key`).
        trusted_keys: device_id -> Ed25519 public key of enrolled devices.
        trust_document_keys: also accept keys that devices declare in session
            documents (pinned on first use), for sites without enrolment.
        wall_clock: seconds since the epoch, for `first_seen` and receipts.
        run_sync: runs the blocking database work, `await run_sync(fn, *args)`;
            a worker thread by default (a simulator under virtual time runs it
            inline, so no thread lets the clock jump while it works).
        actor_for: the Automerge actor the service writes receipts with, per
            document id (random by default).

    Raises:
        LedgerError: the database cannot be opened or holds a broken document.
        LedgerUrlError: the URL is not sqlite:/// or postgresql://.
    """
    run = run_sync or _in_thread
    ledger, docs = await run(_open_ledger, db_url)
    try:
        yield CloudService(
            ledger,
            docs,
            signing_key=signing_key,
            trusted_keys=trusted_keys,
            trust_document_keys=trust_document_keys,
            certify=certify,
            authenticate=authenticate,
            site_entry=site_entry,
            wall_clock=wall_clock,
            operator=operator,
            run_sync=run,
            actor_for=actor_for,
        )
    finally:
        with trio.CancelScope(shield=True):
            await run(ledger.close)


def create_cloud_app(
    db_url: str,
    *,
    signing_key: nacl.signing.SigningKey,
    trusted_keys: Mapping[str, bytes] | None = None,
    trust_document_keys: bool = True,
    certify: Certify | None = None,
    authenticate: Authenticate | None = None,
    site_entry: SiteEntry | None = None,
    wall_clock: Callable[[], float] = time.time,
    operator: OperatorConfig | None = None,
    api_tokens: ApiTokens | None = None,
) -> Starlette:
    """The service as a standalone ASGI app: its lifespan opens and closes the database.

    For running under an ASGI server that drives lifespan events; in-process
    users (tests, the demo, the simulator) use `open_cloud` or `serve_cloud`.
    `api_tokens`: the operator's tokens (`uplink/_cloudauth.py`); None: open.
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_cloud(
            db_url,
            signing_key=signing_key,
            trusted_keys=trusted_keys,
            trust_document_keys=trust_document_keys,
            certify=certify,
            authenticate=authenticate,
            site_entry=site_entry,
            wall_clock=wall_clock,
            operator=operator,
        ) as cloud:
            app.state.cloud = cloud
            yield

    app = _build_app(lambda request: request.app.state.cloud, lifespan=lifespan)
    guard_cloud(app, api_tokens)
    return app


async def serve_cloud(
    db_url: str,
    bind: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    signing_key: nacl.signing.SigningKey | None = None,
    key_path: str | os.PathLike[str] | None = None,
    trusted_keys: Mapping[str, bytes] | None = None,
    trust_document_keys: bool = True,
    certify: Certify | None = None,
    authenticate: Authenticate | None = None,
    site_entry: SiteEntry | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    wall_clock: Callable[[], float] = time.time,
    operator: OperatorConfig | None = None,
    api_tokens: ApiTokens | None = None,
    task_status: trio.TaskStatus[Sequence[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the cloud with Hypercorn's trio worker until cancelled.

    Args:
        port: 0 picks a free port; `task_status.started` reports the bound base
            URLs (e.g. ["http://127.0.0.1:43210"]).
        signing_key: the receipt key; when None it is loaded from `key_path`
            (default: `default_key_path(db_url)`), created on first start.
        certfile, keyfile: PEM files to serve HTTPS instead of HTTP.
        api_tokens: the tokens every route but sync, OCPI, the probe and the page's
            files wants (`uplink/_cloudauth.py`); None serves them open (a lab cloud).
    """
    if signing_key is None:
        signing_key = load_or_create_cloud_key(key_path or default_key_path(db_url))
    async with open_cloud(
        db_url,
        signing_key=signing_key,
        trusted_keys=trusted_keys,
        trust_document_keys=trust_document_keys,
        certify=certify,
        authenticate=authenticate,
        site_entry=site_entry,
        wall_clock=wall_clock,
        operator=operator,
    ) as cloud:
        config = HypercornConfig()
        config.bind = [f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("uplink.cloud.server")
        config.graceful_timeout = 0.5
        config.backlog = BACKLOG
        if certfile is not None:
            config.certfile = certfile
            config.keyfile = keyfile
        guard_cloud(cloud.app, api_tokens)
        log.info("cloud service on %s:%s, issuer %s", bind, port, cloud.issuer)
        await hypercorn_serve(cloud.app, config, task_status=task_status)  # type: ignore[arg-type]
