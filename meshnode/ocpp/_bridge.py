"""The one path from OCPP into the node's session documents.

Every OCPP version handler (`_v16.py`, `_v201.py`) only *translates*: it parses
its version's messages and calls this bridge, which calls the same `SessionService`
the HTTP API uses. So a session a charger runs over OCPP is signed, stored,
replicated, folded and forwarded exactly like one started with `POST /v1/sessions`,
and the rules below hold for every OCPP version at once.

All methods are trio coroutines (the version handlers run on asyncio and reach them
through trio-asyncio, see `_server.py`); the bridge does no network I/O and reads the
clock only through the `wall_clock` it is given.

Rules:

1. **Authorisation** is the node's offline authorisation (`SiteConfigService.authorize`:
   the allowed/revoked lists the cloud signed, then the unknown-id policy). A driver
   token (cloud-signed, several hundred characters) does not fit an OCPP id tag (20
   characters in 1.6, 36 in 2.0.1); `authorize`/`start_transaction` take one for a
   front end that can carry it. Result: `AuthStatus` (Accepted, Blocked, Expired, Invalid), which both
   versions' idTagInfo / idTokenInfo carry.

2. **Exactly once under offline replay.** A charger that lost its node queues its
   transaction messages and sends them again on reconnect, with their original
   timestamps; it also resends a message whose answer it lost. Each message becomes
   at most one event:
   - a start is keyed by what the charger said (charger, connector, id token, meter
     start, timestamp, and the charger's transaction id where it chooses one, 2.0.1).
     The key is written into the start event's data (`ocpp.start_key`), and the
     session id is derived from it (`SessionService.create(request_id=...)`): a resent
     start finds the session the first one made, on this node or, once replicated,
     on any other (the bridge looks the key up among the sessions it holds);
   - a meter reading or stop is keyed by its content (`ocpp.key` in the event's data:
     a hash of the transaction, the timestamp, the readings); a message whose key is
     already among the session's events changes nothing.
   Events keep the charger's timestamps (clamped to be no earlier than the session's
   last event and no later than now), so the fold orders replayed readings as they
   were taken.

3. **Mesh-unique transaction ids that survive restarts** (OCPP 1.6 wants an
   integer from the central system). The id is *derived*, not counted: the first
   31-bit value of SHA-256("ocpp-txid", session id, attempt) that no other session
   this node knows uses with the same charger. The chosen id is written into the start
   event (`ocpp.transaction_id`), so it is replicated with the session and any node,
   after a restart or a failover, maps (charger, id) back to the session by reading
   the documents: nothing needs to be allocated durably, and no node numbering is
   needed. Two nodes that, while partitioned, start sessions for the *same charger*
   could only collide with probability ~ 2^-31 per pair, and a charger talks to one
   node at a time; across chargers ids may repeat and it does not matter, because every
   lookup is by (charger, id). A 2.0.1 charger chooses its own (string) transaction id;
   the bridge keeps that one (`transaction_ref`).

4. **Bad or late input changes nothing and never stalls a charger.** A reading for an
   unknown transaction, a reading after the stop, a reading below the last one: the
   bridge logs it (WARNING) and answers as if stored, because an OCPP charger that
   gets an error on a transaction message retries it forever and blocks its queue.
   (A 1.6 reading or stop of an unknown transaction is held as well: rule 6.)

5. **Limits.** A session accepted offline with limits is stopped by the session
   service when a reading reaches them; `must_stop` tells the version handler to send
   the charger a remote stop.

6. **A 1.6 transaction this node does not know yet is held, not dropped.** When a
   node dies after accepting a 1.6 StartTransaction and before the session document
   reached any other node, the charger fails over and sends that transaction's
   MeterValues and StopTransaction to a node that has never seen it. 1.6 gives the
   central system no way to say "later" (a CALLERROR makes the charger resend the
   message forever and blocks its queue), so the node acknowledges them and *holds*
   them (`HeldMessages`), keyed by (charger, transactionId). When the session
   document arrives (the node's change hook calls `document_changed`; `serve_held`
   applies), the held readings and stop are recorded through the same keyed path as
   live ones, in timestamp order, so each becomes exactly one event however often the
   charger also resent it. The hold is in memory and bounded (`HELD_*`): a count of
   transactions, readings per transaction (the latest are kept; the stop always),
   bytes of signed data, and an age. In memory because it only matters in a double
   fault (the first node died before replicating *and* this one restarts before the
   first comes back), and a durable hold would need a second kind of store; bounded
   because a charger, on an open site any charger, chooses the transaction ids.
   2.0.1 does not need it: it refuses such messages (InternalError) and the station
   resends them (E04).

7. **Charger state** (connected or not, its OCPP version, boot info, connector
   states) is kept per node, in memory: it describes the chargers connected *here*,
   for `/v1/status` and `meshnode status`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from crdt import SITE_CONFIG_ID, decode_event, heads_hash, read_session

from ..services import Conflict, NotAuthorised, NotFound, ServiceError, SessionService

log = logging.getLogger("meshnode.ocpp.bridge")

TXID_MAX = 2**31 - 1
"""OCPP 1.6 transactionId is a JSON integer; chargers keep it in a signed 32-bit int."""
MAX_SIGNED_BYTES = 8 * 1024
"""Signed meter values kept per event (an event is at most 16 KiB); beyond, only their hash."""
FUTURE_SLACK_MS = 5 * 60_000
"""A charger timestamp later than now by more than this is not believed (clock not set)."""
LIVE_WINDOW_MS = 2 * 60_000
"""A start whose timestamp is older than this is a replay: the charger charged already."""
HELD_TRANSACTIONS = 1000
"""Unknown 1.6 transactions whose messages a node holds at once (rule 6); beyond, dropped."""
HELD_READINGS = 1440
"""Readings held per transaction: a day of one a minute. Beyond, the earliest are dropped
(the latest register is what the energy is computed from); the stop is always kept."""
HELD_BYTES = 16 * 1024 * 1024
"""Signed meter data held in all, at most; a reading beyond it is dropped (logged)."""
HELD_MAX_AGE_MS = 7 * 24 * 3_600_000
"""How long a held transaction waits for its session document (the node that started it
must come back, and it may need a repair)."""


class AuthStatus(enum.StrEnum):
    """The authorisation outcome, named as OCPP's idTagInfo/idTokenInfo status."""

    ACCEPTED = "Accepted"
    BLOCKED = "Blocked"
    EXPIRED = "Expired"
    INVALID = "Invalid"


_REASON_STATUS = {
    "revoked": AuthStatus.BLOCKED,
    "token_expired": AuthStatus.EXPIRED,
}


@dataclass(frozen=True)
class Reading:
    """One meter reading, as a version handler parsed it.

    Attributes:
        ts_ms: when the charger took it (ms since the epoch).
        energy_wh: the cumulative import register (Energy.Active.Import.Register) in Wh,
            None when the sample carries no such value.
        signed: the signed values of the sample as the charger sent them (OCMF,
            EDL, ...: kept verbatim for the cloud and for calibration-law checks).
        raw: the whole sampled values (for the content key, not stored).
    """

    ts_ms: int
    energy_wh: int | None
    signed: tuple[Mapping[str, Any], ...] = ()
    raw: Any = None


@dataclass(frozen=True)
class StartResult:
    """What a version handler answers a start with."""

    status: AuthStatus
    transaction_id: int
    """The integer id (1.6); 0 when no session was recorded."""
    session_id: str | None
    existing: bool = False


@dataclass
class ConnectorState:
    status: str
    error_code: str | None
    ts_ms: int


@dataclass
class ChargerState:
    """A charger as this node sees it."""

    charger_id: str
    version: str
    connected: bool
    since_ms: int
    address: str | None = None
    last_seen_ms: int = 0
    boot: dict[str, Any] = field(default_factory=dict)
    connectors: dict[int, ConnectorState] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "charger_id": self.charger_id,
            "version": self.version,
            "connected": self.connected,
            "since_ms": self.since_ms,
            "last_seen_ms": self.last_seen_ms,
            "address": self.address,
            "boot": dict(self.boot),
            "connectors": {
                str(k): {"status": c.status, "error_code": c.error_code, "ts_ms": c.ts_ms}
                for k, c in sorted(self.connectors.items())
            },
        }


def content_key(*parts: Any) -> str:
    """A stable key of a message's content (canonical JSON, SHA-256, 32 hex digits)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def derive_transaction_id(session_id: str, attempt: int) -> int:
    """The `attempt`-th candidate integer transaction id of a session (1 .. 2^31-1)."""
    digest = hashlib.sha256(f"ocpp-txid\0{session_id}\0{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % TXID_MAX + 1


@dataclass
class _Held:
    """A transaction's held messages: readings (by content key) and its stop, if sent."""

    since_ms: int
    readings: dict[str, Reading] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    stop: tuple[str, dict[str, Any]] | None = None


class HeldMessages:
    """The 1.6 messages of transactions not known here yet (rule 6). Sans-IO: `now_ms` is
    passed in; expiry happens on every `hold`, so nothing needs a timer.

    Args:
        max_transactions, max_readings, max_bytes, max_age_ms: the bounds (`HELD_*`).
    """

    def __init__(
        self,
        *,
        max_transactions: int = HELD_TRANSACTIONS,
        max_readings: int = HELD_READINGS,
        max_bytes: int = HELD_BYTES,
        max_age_ms: int = HELD_MAX_AGE_MS,
    ) -> None:
        self.max_transactions = max_transactions
        self.max_readings = max_readings
        self.max_bytes = max_bytes
        self.max_age_ms = max_age_ms
        self._held: dict[tuple[str, int], _Held] = {}
        self.bytes = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def keys(self) -> list[tuple[str, int]]:
        return list(self._held)

    def chargers(self) -> set[str]:
        return {charger for charger, _ in self._held}

    def _entry(self, key: tuple[str, int], now_ms: int) -> _Held | None:
        self.expire(now_ms)
        entry = self._held.get(key)
        if entry is None:
            if len(self._held) >= self.max_transactions:
                self.dropped += 1
                log.warning("charger %s: transaction %d not held: %d held already", key[0], key[1], len(self._held))
                return None
            entry = self._held[key] = _Held(now_ms)
        return entry

    def hold_reading(self, key: tuple[str, int], content: str, reading: Reading, now_ms: int) -> bool:
        """Hold one reading (`content`: its content key; a resent one is held once)."""
        entry = self._entry(key, now_ms)
        if entry is None:
            return False
        if content in entry.readings:
            return True
        signed = tuple(_bounded_signed(reading.signed)) if reading.signed else ()
        size = len(json.dumps(list(signed), default=str)) if signed else 0
        if self.bytes + size > self.max_bytes:
            self.dropped += 1
            log.warning("charger %s: reading of transaction %d not held: %d bytes held", key[0], key[1], self.bytes)
            return False
        entry.readings[content] = Reading(reading.ts_ms, reading.energy_wh, signed)  # (no raw: keyed already)
        entry.sizes[content] = size
        self.bytes += size
        while len(entry.readings) > self.max_readings:
            earliest = min(entry.readings, key=lambda k: (entry.readings[k].ts_ms, k))
            del entry.readings[earliest]
            self.bytes -= entry.sizes.pop(earliest)
            self.dropped += 1
        return True

    def hold_stop(self, key: tuple[str, int], content: str, stop: dict[str, Any], now_ms: int) -> bool:
        """Hold a transaction's stop (the first one sent is kept: a resend is the same)."""
        entry = self._entry(key, now_ms)
        if entry is None:
            return False
        if entry.stop is None:  # (its signed values at most MAX_SIGNED_BYTES, as they will be stored)
            entry.stop = (content, {**stop, "signed": tuple(_bounded_signed(stop["signed"])) if stop["signed"] else ()})
        return True

    def take(self, key: tuple[str, int]) -> tuple[list[tuple[str, Reading]], tuple[str, dict[str, Any]] | None]:
        """Remove and return a transaction's held readings (in timestamp order) and stop."""
        entry = self._held.pop(key, None)
        if entry is None:
            return [], None
        self.bytes -= sum(entry.sizes.values())
        readings = sorted(entry.readings.items(), key=lambda kv: (kv[1].ts_ms, kv[0]))
        return readings, entry.stop

    def expire(self, now_ms: int) -> list[tuple[str, int]]:
        """Drop transactions held longer than `max_age_ms`; returns their keys."""
        gone = [k for k, e in self._held.items() if now_ms - e.since_ms > self.max_age_ms]
        for key in gone:
            readings, stop = self.take(key)
            self.dropped += len(readings) + (stop is not None)
            log.warning("charger %s: held messages of transaction %d expired, its session never arrived", *key)
        return gone


class OcppBridge:
    """Translates charger transactions into session commands; keeps charger states.

    Args:
        sessions: the node's session service (the same one the HTTP API uses).
        wall_clock: seconds since the epoch.
    """

    def __init__(self, sessions: SessionService, *, wall_clock: Callable[[], float]) -> None:
        self.sessions = sessions
        self._wall_clock = wall_clock
        self.chargers: dict[str, ChargerState] = {}
        # (charger, transaction id) -> session id; (charger, start key) -> session id.
        # Built from the documents (start events' data), so they survive restarts and
        # cover sessions other nodes started; refreshed for documents not seen yet.
        self._by_txid: dict[tuple[str, int], str] = {}
        self._by_ref: dict[tuple[str, str], str] = {}
        self._by_start_key: dict[tuple[str, str], str] = {}
        self._scanned: set[str] = set()
        self._locks: dict[str, trio.Lock] = {}
        self._local_list: tuple[bytes, float, tuple[int, list[tuple[str, AuthStatus]]]] | None = None
        self.held = HeldMessages()
        self._arrived: set[str] = set()
        self._wake = trio.Event()

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    def _lock(self, charger: str) -> trio.Lock:
        lock = self._locks.get(charger)
        if lock is None:
            lock = self._locks[charger] = trio.Lock()
        return lock

    # --- authorisation ------------------------------------------------------------------

    def authorize(self, id_token: str, driver_token: str | None = None) -> AuthStatus:
        """The offline authorisation of an id token (and a cloud-signed driver token, for a
        front end that can carry one), as an OCPP status."""
        auth = self.sessions.site_config.authorize(id_token, driver_token)
        if auth.accepted:
            return AuthStatus.ACCEPTED
        return _REASON_STATUS.get(auth.reason, AuthStatus.INVALID)

    def local_list(self) -> tuple[int, list[tuple[str, AuthStatus]]]:
        """The site's lists as a charger's local authorisation list: (version, entries).

        The version is derived from the content (a charger compares versions to decide
        whether to ask for a new list); it is a positive 31-bit integer.
        """
        doc = self.sessions.replica.docs.get(SITE_CONFIG_ID)
        hh = heads_hash(doc.get_heads()) if doc is not None else b""
        now = self._wall_clock()
        # Recomputed when the site config changes (every entry's signature is checked),
        # and once a minute (an entry's verdict can depend on the time).
        if self._local_list is not None and self._local_list[0] == hh and now - self._local_list[1] < 60:
            return self._local_list[2]
        allowed, revoked = self.sessions.site_config.token_lists()
        entries = [(t, AuthStatus.ACCEPTED) for t in allowed] + [(t, AuthStatus.BLOCKED) for t in revoked]
        entries.sort()
        version = int(content_key("local-list", entries)[:8], 16) % TXID_MAX + 1 if entries else 0
        self._local_list = (hh, now, (version, entries))
        return version, entries

    # --- transactions -------------------------------------------------------------------

    def _ts(self, ts_ms: int | None, floor_ms: int | None = None) -> int:
        now = self._now_ms()
        if ts_ms is None or ts_ms > now + FUTURE_SLACK_MS or ts_ms < 1_500_000_000_000:
            ts_ms = now
        if floor_ms is not None and ts_ms < floor_ms:
            ts_ms = floor_ms
        return ts_ms

    def _scan(self) -> None:
        """Index the OCPP transactions of documents not indexed yet (start events' data)."""
        docs = self.sessions.replica.docs
        for doc_id in list(docs):
            if doc_id in self._scanned or doc_id == SITE_CONFIG_ID:
                continue
            self._scanned.add(doc_id)
            try:
                data = read_session(docs[doc_id])
            except Exception:
                continue
            for blob in data.events.values():
                try:
                    body, _ = decode_event(blob)
                except Exception:
                    continue
                if body.get("type") == "start":
                    self._index(data.charger, body.get("data", {}).get("ocpp"), doc_id)

    def _index(self, charger: str, ocpp: Any, session_id: str) -> None:
        if not isinstance(ocpp, dict):
            return
        txid, ref, key = ocpp.get("transaction_id"), ocpp.get("transaction_ref"), ocpp.get("start_key")
        if isinstance(txid, int):
            self._by_txid.setdefault((charger, txid), session_id)
        if isinstance(ref, str):
            self._by_ref.setdefault((charger, ref), session_id)
        if isinstance(key, str):
            self._by_start_key.setdefault((charger, key), session_id)

    def find(self, charger: str, transaction_id: int | None = None, transaction_ref: str | None = None) -> str | None:
        """The session of a charger's transaction (by 1.6 integer id or 2.0.1 string id), or None."""
        for _ in range(2):
            if transaction_id is not None and (charger, transaction_id) in self._by_txid:
                return self._by_txid[(charger, transaction_id)]
            if transaction_ref is not None and (charger, transaction_ref) in self._by_ref:
                return self._by_ref[(charger, transaction_ref)]
            self._scan()
        return None

    def transaction_id_of(self, session_id: str) -> int | None:
        """The integer transaction id of a session started over OCPP (for a remote stop)."""
        self._scan()
        for (_, txid), sid in self._by_txid.items():
            if sid == session_id:
                return txid
        return None

    async def start_transaction(
        self,
        charger: str,
        connector: int,
        id_token: str,
        meter_start_wh: int | None,
        ts_ms: int | None,
        *,
        transaction_ref: str | None = None,
        reservation_id: int | None = None,
        driver_token: str | None = None,
    ) -> StartResult:
        """A charger started a transaction: record the session (once).

        A live start the offline authorisation refuses records nothing (the charger is
        told Blocked/Invalid and does not charge). A replayed start (its timestamp older
        than `LIVE_WINDOW_MS`) is recorded even when refused now, flagged for review:
        the charger did charge, on its own authorisation, while its node was away.
        """
        async with self._lock(charger):
            start_key = content_key("start", charger, connector, id_token, meter_start_wh, ts_ms, transaction_ref)
            self._scan()
            existing = self._by_start_key.get((charger, start_key))
            if existing is None and transaction_ref is not None:
                existing = self._by_ref.get((charger, transaction_ref))
            if existing is not None:  # (also when archived since: a late replay adds nothing)
                return StartResult(
                    self.authorize(id_token, driver_token),
                    self.transaction_id_of(existing) or 0,
                    existing,
                    existing=True,
                )
            status = self.authorize(id_token, driver_token)
            replay = ts_ms is not None and ts_ms < self._now_ms() - LIVE_WINDOW_MS
            if status is not AuthStatus.ACCEPTED and not replay:
                return StartResult(status, 0, None)
            # The session id the service derives from (node, charger, connector, request id).
            session_id = self.sessions.session_id_for(charger, connector, f"ocpp:{start_key}")
            attempt = 0
            txid = derive_transaction_id(session_id, attempt)
            while (charger, txid) in self._by_txid and self._by_txid[(charger, txid)] != session_id:
                attempt += 1
                txid = derive_transaction_id(session_id, attempt)
            ocpp: dict[str, Any] = {"transaction_id": txid, "start_key": start_key}
            if transaction_ref is not None:
                ocpp["transaction_ref"] = transaction_ref
            if reservation_id is not None:
                ocpp["reservation_id"] = reservation_id
            try:
                session = await self.sessions.create(
                    charger,
                    connector,
                    id_token,
                    meter_wh=meter_start_wh,
                    driver_token=driver_token,
                    request_id=f"ocpp:{start_key}",
                    ts_ms=self._ts(ts_ms),
                    start_data={"ocpp": ocpp},
                    record_refused=replay,
                )
            except NotAuthorised:
                return StartResult(status, 0, None)
            except Conflict as exc:  # started before, archived since: nothing to add
                log.warning("charger %s: start %s: %s", charger, start_key, exc.message)
                return StartResult(status, txid, None, existing=True)
            self._index(charger, ocpp, session_id)
            return StartResult(status, txid, session_id, existing=bool(session.get("existing")))

    async def meter(
        self,
        charger: str,
        readings: Sequence[Reading],
        *,
        transaction_id: int | None = None,
        transaction_ref: str | None = None,
        connector: int | None = None,
    ) -> int:
        """Record meter readings of a transaction; returns how many became events.

        Readings without an energy register are ignored (a power or voltage sample is not
        a session event). Duplicates (same content key) and late or backwards readings
        change nothing (rule 4).
        """
        keyed = [
            (content_key("meter", transaction_id, transaction_ref, r.ts_ms, r.raw), r)
            for r in readings
            if r.energy_wh is not None
        ]
        async with self._lock(charger):
            session_id = self.find(charger, transaction_id, transaction_ref)
            if session_id is None:
                if self._holds(transaction_id, transaction_ref):
                    assert transaction_id is not None
                    for key, reading in keyed:
                        self.held.hold_reading((charger, transaction_id), key, reading, self._now_ms())
                    if keyed:
                        log.info("charger %s: readings of unknown transaction %d held", charger, transaction_id)
                elif readings and (transaction_id is not None or transaction_ref is not None):
                    log.warning(
                        "charger %s: meter values for unknown transaction %s",
                        charger,
                        transaction_id or transaction_ref,
                    )
                return 0
            return await self._meter_locked(charger, session_id, keyed)

    @staticmethod
    def _holds(transaction_id: int | None, transaction_ref: str | None) -> bool:
        """Whether messages of an unknown transaction are held (rule 6): 1.6 ids only (0 is
        what a refused start was answered with: never a session)."""
        return transaction_ref is None and transaction_id is not None and 0 < transaction_id <= TXID_MAX

    async def _meter_locked(self, charger: str, session_id: str, keyed: Sequence[tuple[str, Reading]]) -> int:
        recorded = 0
        for key, reading in keyed:
            assert reading.energy_wh is not None
            if await self._record(charger, session_id, "meter", reading.energy_wh, reading.ts_ms, key, reading.signed):
                recorded += 1
        return recorded

    def must_stop(self, charger: str, transaction_id: int | None = None, transaction_ref: str | None = None) -> bool:
        """Whether the node ended this transaction's session and the charger has not stopped it.

        That happens when a session accepted offline with limits reaches them (the
        session service appends the stop); the version handler then sends the charger a
        remote stop, since the charger itself knows nothing of the limits.
        """
        session_id = self.find(charger, transaction_id, transaction_ref)
        if session_id is None or session_id not in self.sessions.replica.docs:
            return False
        _, view = self.sessions.fold(session_id)
        if view.state not in ("completed", "reconciled"):
            return False
        stops = [e for e in view.applied if e.record.type == "stop"]
        return not any(isinstance(e.record.data.get("ocpp"), dict) for e in stops)

    async def stop_transaction(
        self,
        charger: str,
        meter_stop_wh: int | None,
        ts_ms: int | None,
        *,
        transaction_id: int | None = None,
        transaction_ref: str | None = None,
        reason: str | None = None,
        id_token: str | None = None,
        readings: Sequence[Reading] = (),
        signed: Sequence[Mapping[str, Any]] = (),
    ) -> str | None:
        """Record a transaction's end (after its `readings`, e.g. 1.6 transactionData).

        Returns:
            The session id, None for an unknown transaction (logged, answered as accepted).
        """
        await self.meter(charger, readings, transaction_id=transaction_id, transaction_ref=transaction_ref)
        stop: dict[str, Any] = {
            "meter_stop_wh": meter_stop_wh,
            "ts_ms": ts_ms,
            "transaction_id": transaction_id,
            "transaction_ref": transaction_ref,
            "reason": reason,
            "id_token": id_token,
            "signed": tuple(signed),
        }
        async with self._lock(charger):
            session_id = self.find(charger, transaction_id, transaction_ref)
            if session_id is None:
                if self._holds(transaction_id, transaction_ref):
                    assert transaction_id is not None
                    key = content_key("stop", transaction_id, transaction_ref, ts_ms, meter_stop_wh)
                    if self.held.hold_stop((charger, transaction_id), key, stop, self._now_ms()):
                        log.info("charger %s: stop of unknown transaction %d held", charger, transaction_id)
                    return None
                log.warning("charger %s: stop for unknown transaction %s", charger, transaction_id or transaction_ref)
                return None
            await self._stop_locked(charger, session_id, **stop)
            return session_id

    async def _stop_locked(
        self,
        charger: str,
        session_id: str,
        *,
        meter_stop_wh: int | None,
        ts_ms: int | None,
        transaction_id: int | None,
        transaction_ref: str | None,
        reason: str | None,
        id_token: str | None,
        signed: tuple[Mapping[str, Any], ...],
    ) -> bool:
        if meter_stop_wh is None:
            _, view = self.sessions.fold(session_id)
            meter_stop_wh = view.last_meter_wh if view.last_meter_wh is not None else 0
        key = content_key("stop", transaction_id, transaction_ref, ts_ms, meter_stop_wh)
        extra: dict[str, Any] = {}
        if reason:
            extra["reason"] = reason
        if id_token:
            extra["id_token"] = id_token
        return await self._record(charger, session_id, "stop", meter_stop_wh, ts_ms, key, signed, extra)

    # --- held messages (rule 6) ---------------------------------------------------------

    def document_changed(self, doc_id: str) -> None:
        """The node's change hook (`Node.change_listeners`): a document arrived or changed.

        While messages are held, the document is indexed again (it may carry a start it
        did not carry when first seen) and `serve_held` is woken to apply what it can.
        """
        if not len(self.held) or doc_id == SITE_CONFIG_ID:
            return
        self._scanned.discard(doc_id)
        self._wake.set()

    async def serve_held(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply held messages whenever a document arrives, until cancelled."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self.apply_held()

    async def apply_held(self) -> int:
        """Record the held messages of every transaction whose session is now known here, in
        timestamp order (readings, then the stop), each through its content key, so once.

        Returns:
            How many events were appended.
        """
        self.held.expire(self._now_ms())
        self._scan()
        appended = 0
        for charger, txid in self.held.keys():
            async with self._lock(charger):
                session_id = self._by_txid.get((charger, txid))
                if session_id is None:
                    continue
                readings, stop = self.held.take((charger, txid))
                log.info(
                    "charger %s: transaction %d arrived: %d held readings%s",
                    charger, txid, len(readings), " and its stop" if stop else "",
                )  # fmt: skip
                appended += await self._meter_locked(charger, session_id, readings)
                if stop is not None and await self._stop_locked(charger, session_id, **stop[1]):
                    appended += 1
        return appended

    async def _record(
        self,
        charger: str,
        session_id: str,
        type: str,
        meter_wh: int,
        ts_ms: int | None,
        key: str,
        signed: tuple[Mapping[str, Any], ...] = (),
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Append one event unless its key is already in the session. True if appended."""
        try:
            _, view = self.sessions.fold(session_id)
        except (KeyError, NotFound):
            log.warning("charger %s: session %s is not on this node", charger, session_id)
            return False
        # The applied events, parsed and verified already by the (cached) fold: an event
        # the fold did not apply was refused for its content, and a replay of it is
        # refused again by the service's own checks.
        for event in view.applied:
            ocpp = event.record.data.get("ocpp")
            if isinstance(ocpp, dict) and ocpp.get("key") == key:
                return False
        floor = view.applied[-1].record.ts if view.applied else None
        ocpp_data: dict[str, Any] = {"key": key, **(extra or {})}
        if signed:
            ocpp_data["signed"] = _bounded_signed(signed)
        try:
            await self.sessions.record(
                session_id, type, meter_wh, ts_ms=self._ts(ts_ms, floor), data={"ocpp": ocpp_data}
            )
        except ServiceError as exc:
            log.warning("charger %s: %s on session %s not recorded: %s", charger, type, session_id, exc.message)
            return False
        return True

    # --- charger states -----------------------------------------------------------------

    def connected(self, charger: str, version: str, address: str | None) -> None:
        now = self._now_ms()
        state = self.chargers.get(charger)
        if state is None:
            state = self.chargers[charger] = ChargerState(charger, version, True, now)
        state.version, state.connected, state.since_ms, state.address, state.last_seen_ms = (
            version, True, now, address, now,
        )  # fmt: skip

    def disconnected(self, charger: str) -> None:
        state = self.chargers.get(charger)
        if state is not None:
            state.connected = False
            state.since_ms = self._now_ms()

    def seen(self, charger: str) -> None:
        state = self.chargers.get(charger)
        if state is not None:
            state.last_seen_ms = self._now_ms()

    def booted(self, charger: str, info: Mapping[str, Any]) -> None:
        state = self.chargers.get(charger)
        if state is not None:
            state.boot = {k: v for k, v in info.items() if isinstance(v, str | int | float) and v is not None}

    def connector_status(
        self, charger: str, connector: int, status: str, error_code: str | None, ts_ms: int | None
    ) -> None:
        state = self.chargers.get(charger)
        if state is not None:
            state.connectors[connector] = ConnectorState(status, error_code, self._ts(ts_ms))

    def status_json(self) -> list[dict[str, Any]]:
        """The chargers this node has seen, for `/v1/status` (`"chargers"`)."""
        return [c.to_json() for _, c in sorted(self.chargers.items())]


def _bounded_signed(signed: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Signed values as sent, unless together they exceed `MAX_SIGNED_BYTES`: then their hash."""
    blob = json.dumps(list(signed), sort_keys=True, default=str)
    if len(blob) <= MAX_SIGNED_BYTES:
        return json.loads(blob)
    return [{"sha256": hashlib.sha256(blob.encode()).hexdigest(), "bytes": len(blob), "truncated": True}]


__all__ = [
    "AuthStatus",
    "ChargerState",
    "HeldMessages",
    "OcppBridge",
    "Reading",
    "StartResult",
    "content_key",
    "derive_transaction_id",
]
