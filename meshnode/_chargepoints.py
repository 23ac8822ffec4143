"""Simulated OCPP charge points (1.6J and 2.0.1) for `meshnode demo` and the tests.

The charge-point side is the `ocpp` library's own `ChargePoint` over a `websockets`
client: the node's central system talks to the same code a real charger's
firmware would be tested against. These run in asyncio (the library is asyncio);
the demo hosts them in its trio run through `trio_asyncio`, tests with
`asyncio.run`.

What a charger here does, as a real one does:

- it is given a list of central-system URLs (its network connection profiles, in
  priority order) and connects to the first that answers; when the connection
  breaks it tries the next ones, round-robin, with a short pause;
- transaction messages (2.0.1 TransactionEvent, 1.6 Start/StopTransaction and
  transaction MeterValues) that cannot be delivered are queued and replayed in
  order on the next connection, with their original timestamps (2.0.1 sets
  `offline: true` on them); other messages are not queued (OCPP 2.0.1 E04);
- it answers the node's RequestStart/RequestStopTransaction (RemoteStart/
  RemoteStopTransaction in 1.6) by starting or stopping a transaction, takes
  SendLocalList and SetNetworkProfile (a new profile URL joins its list).

A message is "acknowledged" when its CALLRESULT arrived: the node has made it
durable then. Callers read `acked` to know what the node confirmed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import itertools
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import websockets
from ocpp.exceptions import OCPPError
from ocpp.routing import on
from ocpp.v16 import ChargePoint as _Cp16
from ocpp.v16 import call as call16
from ocpp.v201 import ChargePoint as _Cp201
from ocpp.v201 import call as call201

log = logging.getLogger("meshnode.chargepoints")

RECONNECT_PAUSE = 0.3
"""Seconds between two connection attempts (a real charger backs off longer)."""
CONNECT_TIMEOUT = 3.0
CALL_TIMEOUT = 8.0
TX_ATTEMPTS = 10
"""TransactionMessageAttempts: how often a transaction message the central system refuses is sent."""
TX_RETRY_INTERVAL = 0.5
"""TransactionMessageRetryInterval, seconds (a real station waits longer, growing)."""


def iso(ts: float | None = None) -> str:
    """An OCPP timestamp (UTC, milliseconds)."""
    when = datetime.datetime.now(datetime.UTC) if ts is None else datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Transaction:
    """One transaction as the charger sees it."""

    tx_id: str
    """2.0.1: chosen by the charger. 1.6: the central system's integer, as text ("" until known)."""
    evse: int
    id_token: str
    start_meter: int
    meter: int
    remote_start_id: int | None = None
    ended: bool = False
    stop_meter: int | None = None
    started_acked: bool = False
    stop_acked: bool = False


class ChargerOffline(Exception):
    """The message could not be delivered now (it was queued if it is a transaction message)."""


@dataclass
class _Queued:
    payload: Any
    tx: Transaction | None
    kind: str


class _Cp201Handler(_Cp201):
    owner: SimChargePoint

    @on("RequestStartTransaction")
    async def on_request_start(self, id_token: dict[str, Any], remote_start_id: int, evse_id: int | None = None, **_):
        self.owner.remote_starts.append((id_token["id_token"], evse_id, remote_start_id))
        tx = self.owner.remote_start(id_token["id_token"], evse_id or 1, remote_start_id)
        return _result201("RequestStartTransaction", status="Accepted" if tx else "Rejected")

    @on("RequestStopTransaction")
    async def on_request_stop(self, transaction_id: str, **_):
        ok = self.owner.remote_stop(transaction_id)
        return _result201("RequestStopTransaction", status="Accepted" if ok else "Rejected")

    @on("SendLocalList")
    async def on_send_local_list(self, version_number: int, update_type: str, local_authorization_list=None, **_):
        self.owner.local_list_version = version_number
        entries = {
            e["id_token"]["id_token"]: e.get("id_token_info", {}).get("status") for e in local_authorization_list or []
        }
        if update_type == "Full":
            self.owner.local_list = entries
        else:
            self.owner.local_list.update(entries)
        return _result201("SendLocalList", status="Accepted")

    @on("GetLocalListVersion")
    async def on_get_local_list_version(self, **_):
        return _result201("GetLocalListVersion", version_number=self.owner.local_list_version)

    @on("SetNetworkProfile")
    async def on_set_network_profile(self, configuration_slot: int, connection_data: dict[str, Any], **_):
        self.owner.set_profile(configuration_slot, connection_data["ocpp_csms_url"])
        return _result201("SetNetworkProfile", status="Accepted")


class _Cp16Handler(_Cp16):
    owner: SimChargePoint

    @on("RemoteStartTransaction")
    async def on_remote_start(self, id_tag: str, connector_id: int | None = None, **_):
        self.owner.remote_starts.append((id_tag, connector_id, None))
        tx = self.owner.remote_start(id_tag, connector_id or 1, None)
        return _result16("RemoteStartTransaction", status="Accepted" if tx else "Rejected")

    @on("RemoteStopTransaction")
    async def on_remote_stop(self, transaction_id: int, **_):
        ok = self.owner.remote_stop(str(transaction_id))
        return _result16("RemoteStopTransaction", status="Accepted" if ok else "Rejected")

    @on("SendLocalList")
    async def on_send_local_list(self, list_version: int, update_type: str, local_authorization_list=None, **_):
        self.owner.local_list_version = list_version
        entries = {e["id_tag"]: e.get("id_tag_info", {}).get("status") for e in local_authorization_list or []}
        if update_type == "Full":
            self.owner.local_list = entries
        else:
            self.owner.local_list.update(entries)
        return _result16("SendLocalList", status="Accepted")

    @on("GetLocalListVersion")
    async def on_get_local_list_version(self, **_):
        return _result16("GetLocalListVersion", list_version=self.owner.local_list_version)


def _result201(action: str, **kwargs: Any) -> Any:
    from ocpp.v201 import call_result

    return getattr(call_result, action)(**kwargs)


def _result16(action: str, **kwargs: Any) -> Any:
    from ocpp.v16 import call_result

    return getattr(call_result, action)(**kwargs)


@dataclass
class SimChargePoint:
    """One simulated charge point.

    Args:
        cp_id: its charge point id (the last path segment of the URL).
        urls: central-system base URLs in priority order, e.g.
            ``["ws://127.0.0.1:9000/ocpp"]``; the id is appended.
        version: "2.0.1" or "1.6".
        password: Security Profile 1 (HTTP Basic, the id as user), or None.
    """

    cp_id: str
    urls: list[str]
    version: str = "2.0.1"
    password: str | None = None
    evses: int = 2
    connected_url: str | None = None
    transactions: dict[str, Transaction] = field(default_factory=dict)
    queue: list[_Queued] = field(default_factory=list)
    acked: list[tuple[str, Any]] = field(default_factory=list)
    """(action, request payload) of every CALL the central system answered with a CALLRESULT."""
    errors: list[str] = field(default_factory=list)
    remote_starts: list[tuple[str, int | None, int | None]] = field(default_factory=list)
    remote_stops: list[str] = field(default_factory=list)
    """Transaction ids the central system asked to stop (RequestStop/RemoteStopTransaction)."""
    local_list: dict[str, Any] = field(default_factory=dict)
    local_list_version: int = 0
    profiles: dict[int, str] = field(default_factory=dict)
    connections: int = 0
    refusals: int = 0
    """Transaction messages the central system answered with a CALLERROR (each is sent again)."""

    def __post_init__(self) -> None:
        self._cp: _Cp201 | _Cp16 | None = None
        self._ws: Any = None
        self._connected = asyncio.Event()
        self._seq = itertools.count()
        self._flush_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._paused = False
        for i, url in enumerate(self.urls):
            self.profiles.setdefault(i, url)

    # -- connection --

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def set_profile(self, slot: int, url: str) -> None:
        """A network connection profile from the central system (SetNetworkProfile)."""
        base = url.rstrip("/")
        if base.endswith("/" + self.cp_id):
            base = base[: -len(self.cp_id) - 1]
        self.profiles[slot] = base
        self.urls = [self.profiles[k] for k in sorted(self.profiles)]

    async def serve(self) -> None:
        """Stay connected to one of the central systems until cancelled."""
        for i in itertools.count():
            if self._paused:
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            url = self.urls[i % len(self.urls)]
            try:
                await self._session(url)
            except (TimeoutError, OSError, websockets.exceptions.WebSocketException) as exc:
                log.debug("%s: %s: %r", self.cp_id, url, exc)
            await asyncio.sleep(RECONNECT_PAUSE)

    async def _session(self, base: str) -> None:
        headers = {}
        if self.password is not None:
            token = base64.b64encode(f"{self.cp_id}:{self.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        sub: Any = "ocpp2.0.1" if self.version == "2.0.1" else "ocpp1.6"
        async with asyncio.timeout(CONNECT_TIMEOUT):
            ws = await websockets.connect(
                f"{base}/{self.cp_id}", subprotocols=[sub], additional_headers=headers, open_timeout=CONNECT_TIMEOUT
            )
        async with ws:
            cls = _Cp201Handler if self.version == "2.0.1" else _Cp16Handler
            cp = cls(self.cp_id, ws, response_timeout=CALL_TIMEOUT)
            cp.owner = self
            reader = asyncio.ensure_future(cp.start())
            try:
                self._cp, self._ws = cp, ws
                self.connections += 1
                if self.version == "2.0.1":
                    boot: Any = call201.BootNotification(
                        charging_station={"model": "sim", "vendor_name": "meshnode"}, reason="PowerUp"
                    )
                else:
                    boot = call16.BootNotification(charge_point_model="sim", charge_point_vendor="meshnode")
                await cp.call(boot, suppress=False)
                self.connected_url = base
                self._connected.set()
                await self.flush()
                await reader
            finally:
                self._connected.clear()
                self._cp = self._ws = None
                self.connected_url = None
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader

    async def wait_connected(self, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def drop(self, *, stay_offline: bool = False) -> None:
        """Close the connection (a cable pulled); with `stay_offline`, until `resume`."""
        self._paused = stay_offline
        if self._ws is not None:
            await self._ws.close()
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(5):
                while self.connected:
                    await asyncio.sleep(0.01)

    def resume(self) -> None:
        self._paused = False

    # -- calls --

    async def call(self, payload: Any) -> Any:
        """Send a CALL now; raises ChargerOffline when not connected or the connection breaks."""
        cp = self._cp
        if cp is None or not self.connected:
            raise ChargerOffline(self.cp_id)
        try:
            result = await cp.call(payload, suppress=False)
        except (TimeoutError, websockets.exceptions.ConnectionClosed, OSError) as exc:
            raise ChargerOffline(f"{self.cp_id}: {exc!r}") from exc
        self.acked.append((type(payload).__name__, payload))
        return result

    async def _tx_call(self, payload: Any, tx: Transaction | None, kind: str) -> Any:
        """A transaction message: delivered in order, queued when it cannot be."""
        async with self._flush_lock:
            if not self.queue:
                try:
                    return await self._deliver(_Queued(payload, tx, kind))
                except ChargerOffline:
                    pass
            if self.version == "2.0.1":
                payload.offline = True
            self.queue.append(_Queued(payload, tx, kind))
            return None

    async def flush(self) -> None:
        """Replay the queued transaction messages in order (on reconnect)."""
        async with self._flush_lock:
            while self.queue:
                try:
                    await self._deliver(self.queue[0])
                except ChargerOffline:
                    return
                self.queue.pop(0)

    async def _deliver(self, item: _Queued) -> Any:
        """Deliver one transaction message; a CALLERROR is retried (2.0.1 E04:
        `TX_ATTEMPTS` attempts, `TX_RETRY_INTERVAL` apart), then the message is dropped."""
        for attempt in range(1, TX_ATTEMPTS + 1):
            try:
                return await self._deliver_once(item)
            except OCPPError as exc:
                self.refusals += 1
                if attempt == TX_ATTEMPTS:
                    self.errors.append(f"{type(item.payload).__name__} dropped after {attempt} attempts: {exc}")
                    log.warning("%s: %s", self.cp_id, self.errors[-1])
                    return None
                await asyncio.sleep(TX_RETRY_INTERVAL)
        return None

    async def _deliver_once(self, item: _Queued) -> Any:
        if self.version == "1.6" and item.tx is not None and item.kind != "start":
            # A 1.6 message names the transaction by the central system's id: fill it in now.
            if not item.tx.started_acked:
                raise ChargerOffline("start not acknowledged yet")
            item.payload.transaction_id = int(item.tx.tx_id)
        result = await self.call(item.payload)
        if item.tx is not None:
            if item.kind == "start":
                item.tx.started_acked = True
                if self.version == "1.6":
                    old = item.tx.tx_id
                    item.tx.tx_id = str(result.transaction_id)
                    self.transactions.pop(old, None)
                    self.transactions[item.tx.tx_id] = item.tx
            elif item.kind == "stop":
                item.tx.stop_acked = True
        return result

    # -- the driver's side: transactions --

    def _tx_event(self, event_type: str, tx: Transaction, trigger: str, ts: float | None, **extra: Any) -> Any:
        meter = [
            {
                "timestamp": iso(ts),
                "sampled_value": [
                    {"value": tx.meter, "measurand": "Energy.Active.Import.Register", "unit_of_measure": {"unit": "Wh"}}
                ],
            }
        ]
        info: dict[str, Any] = {"transaction_id": tx.tx_id}
        if extra.pop("stopped_reason", None) is not None:
            info["stopped_reason"] = "Remote" if trigger == "RemoteStop" else "Local"
        if tx.remote_start_id is not None and event_type == "Started":
            info["remote_start_id"] = tx.remote_start_id
        return call201.TransactionEvent(
            event_type=event_type,
            timestamp=iso(ts),
            trigger_reason=trigger,
            seq_no=next(self._seq),
            transaction_info=info,
            meter_value=meter,
            **extra,
        )

    async def start(
        self, id_token: str, meter: int, *, evse: int = 1, remote_start_id: int | None = None, ts: float | None = None
    ) -> Transaction:
        """Start a transaction (queued when offline). 2.0.1 picks the transaction id here."""
        tx = Transaction(
            uuid.uuid4().hex if self.version == "2.0.1" else f"pending-{uuid.uuid4().hex}",
            evse, id_token, meter, meter, remote_start_id,
        )  # fmt: skip
        self.transactions[tx.tx_id] = tx
        if self.version == "2.0.1":
            payload: Any = self._tx_event(
                "Started", tx, "RemoteStart" if remote_start_id is not None else "Authorized", ts,
                evse={"id": evse, "connector_id": 1}, id_token={"id_token": id_token, "type": "ISO14443"},
            )  # fmt: skip
        else:
            payload = call16.StartTransaction(connector_id=evse, id_tag=id_token, meter_start=meter, timestamp=iso(ts))
        await self._tx_call(payload, tx, "start")
        return tx

    async def meter(self, tx: Transaction, meter: int, *, ts: float | None = None) -> None:
        tx.meter = meter
        if self.version == "2.0.1":
            payload: Any = self._tx_event("Updated", tx, "MeterValuePeriodic", ts)
        else:
            payload = call16.MeterValues(
                connector_id=tx.evse,
                transaction_id=0,
                meter_value=[
                    {
                        "timestamp": iso(ts),
                        "sampled_value": [
                            {"value": str(meter), "measurand": "Energy.Active.Import.Register", "unit": "Wh"}
                        ],
                    }
                ],
            )
        await self._tx_call(payload, tx, "meter")

    async def stop(
        self, tx: Transaction, meter: int, *, trigger: str = "StopAuthorized", ts: float | None = None
    ) -> None:
        tx.meter, tx.stop_meter, tx.ended = meter, meter, True
        if self.version == "2.0.1":
            payload: Any = self._tx_event("Ended", tx, trigger, ts, stopped_reason=True)
        else:
            payload = call16.StopTransaction(
                meter_stop=meter, timestamp=iso(ts), transaction_id=0,
                reason="Remote" if trigger == "RemoteStop" else "Local",
            )  # fmt: skip
        await self._tx_call(payload, tx, "stop")

    def remote_start(self, id_token: str, evse: int, remote_start_id: int | None) -> bool:
        if any(not t.ended and t.evse == evse for t in self.transactions.values()):
            return False
        self._spawn(self.start(id_token, 0, evse=evse, remote_start_id=remote_start_id))
        return True

    def remote_stop(self, tx_id: str) -> bool:
        self.remote_stops.append(tx_id)
        tx = self.transactions.get(tx_id)
        if tx is None or tx.ended:
            return False
        self._spawn(self.stop(tx, tx.meter, trigger="RemoteStop"))
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, timeout: float = 30.0) -> None:
        """Until the tasks started by remote commands are done and the queue is empty."""
        async with asyncio.timeout(timeout):
            while self._tasks or self.queue:
                await asyncio.sleep(0.05)

    async def status(self, evse: int, status: str) -> None:
        if self.version == "2.0.1":
            await self.call(
                call201.StatusNotification(timestamp=iso(), connector_status=status, evse_id=evse, connector_id=1)
            )
        else:
            await self.call(call16.StatusNotification(connector_id=evse, error_code="NoError", status=status))


async def run_charge_points(chargers: Sequence[SimChargePoint]) -> None:
    """Serve several charge points until cancelled (their connection loops)."""
    async with asyncio.TaskGroup() as tg:
        for cp in chargers:
            tg.create_task(cp.serve())


@contextlib.asynccontextmanager
async def running(*chargers: SimChargePoint, connect: bool = True) -> Any:
    """Serve charge points for the body of an ``async with`` (cancelled after it)."""
    tasks = [asyncio.ensure_future(cp.serve()) for cp in chargers]
    try:
        if connect:
            for cp in chargers:
                await cp.wait_connected()
        yield chargers
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
