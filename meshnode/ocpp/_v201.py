"""OCPP 2.0.1, as translations into bridge calls.

Charging station -> node (``@on`` handlers): BootNotification, Heartbeat,
StatusNotification, Authorize, TransactionEvent (Started / Updated / Ended, with
``seqNo`` and ``offline``), MeterValues, and the acknowledgements a station sends
unasked (NotifyEvent, SecurityEventNotification, FirmwareStatusNotification,
LogStatusNotification: answered, nothing stored).

Node -> station (`V201Commands`, trio): RequestStartTransaction,
RequestStopTransaction, SendLocalList, GetLocalListVersion, SetNetworkProfile.
After a BootNotification and on every Heartbeat the node compares the station's
local list version with the site's lists and sends a full list when they differ
(as for 1.6), so the station can authorise drivers by itself when its node is gone.

Nothing here decides anything about sessions: every rule (authorisation,
exactly once under replay, transaction ids) is the bridge's (`_bridge.py`). The
2.0.1 specifics handled here:

- **the transaction id is the station's** (``transactionInfo.transactionId``, a
  string): the bridge keeps it as the session's `transaction_ref`, so a station that
  fails over to another node names its transaction the same way there;
- **connector = EVSE id** (``evse.id``; a station names the EVSE in the first
  TransactionEvent of a transaction);
- **energy**: sampled values whose measurand is ``Energy.Active.Import.Register``
  (the default when absent), total (no phase), unit Wh or kWh with the 10^multiplier,
  become readings (a register outside 0 .. 2^53 Wh, like an unprintable idToken or
  transactionId, is PropertyConstraintViolation and stores nothing, as in 1.6); a ``signedMeterValue`` is kept verbatim in the event's data. The
  start reading is the Started event's register (``Transaction.Begin``), the stop
  reading the Ended event's last register (``Transaction.End``); energy_wh of the
  session is their difference, as the fold computes it;
- **a transaction started before authorisation** (Started without ``idToken``, e.g.
  on cable plug-in) is held in memory until the event that carries the idToken
  (``Authorized``): only then is there a driver to bill, and the session starts with
  the Started event's timestamp and register. A transaction that ends unauthorised
  makes no session;
- **MeterValues** (the request, not TransactionEvent) carries a station's meter
  samples outside transactions in 2.0.1: answered, not stored (no session to put
  them in);
- ``offline: true`` marks a queued event sent again on reconnect: the bridge
  recognises replays by content and timestamp, so the flag needs no rule of its own;
- **an Updated or Ended for a transaction this node does not know** gets a CALLERROR
  (InternalError), unlike 1.6 (where the bridge acknowledges and logs it, rule 4): after
  a failover its start may still be on its way from the node that died, and a 2.0.1
  station sends a refused transaction message again a bounded number of times
  (``TransactionMessageAttempts`` / ``TransactionMessageRetryInterval``, OCPP 2.0.1
  E04 and the Transaction ctrlr variables), so the reading is delayed, not lost, and
  the station's queue moves on after the last attempt. A transaction whose start this
  connection refused is remembered (bounded) and its later events answered normally.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ocpp.exceptions import InternalError, PropertyConstraintViolationError
from ocpp.messages import validate_payload
from ocpp.routing import after, on
from ocpp.v201 import ChargePoint as V201ChargePoint
from ocpp.v201 import call, call_result
from ocpp.v201.enums import Action

from ._bridge import AuthStatus, Reading
from ._handler import OcppHandler, check_token, check_wh
from ._server import ChargerContext, OcppServer, parse_time, register_version

log = logging.getLogger("meshnode.ocpp.v201")

SUBPROTOCOL = "ocpp2.0.1"
HEARTBEAT_INTERVAL = 60
"""Seconds between heartbeats we ask for in BootNotificationResponse."""
ENERGY_MEASURAND = "Energy.Active.Import.Register"
MAX_UNAUTHORISED = 16
"""Transactions started without an idToken held per connection (a station has a few EVSEs)."""
MAX_REFUSED = 64
"""Transactions whose start this connection refused, remembered so their Ended is answered."""


def _id_token_info(status: AuthStatus) -> dict[str, Any]:
    return {"status": status.value}


def _token_text(token: Any) -> str | None:
    """The id token a session records: the idToken, or for a station without
    authorisation (type NoAuthorization, idToken "") the type itself, so a free-vend
    station's sessions are recorded (under the site's unknown-id policy) rather than
    refused. Unprintable: PropertyConstraintViolation."""
    if not token:
        return None
    text, kind = token.get("id_token"), token.get("type")
    if text == "" and kind == "NoAuthorization":
        return "NoAuthorization"
    return check_token(text, "idToken")


def readings_of(meter_value: Any) -> list[Reading]:
    """Bridge readings from a 2.0.1 ``meterValue`` list (already schema-checked).

    One reading per MeterValue; its energy is the total import register when it has
    one (else None), and its signed values are kept whatever their measurand.
    """
    out = []
    for mv in meter_value or []:
        ts = parse_time(mv.get("timestamp"))
        if ts is None:
            continue
        energy: int | None = None
        signed = []
        for sv in mv.get("sampled_value") or []:
            if sv.get("signed_meter_value"):
                signed.append({k: v for k, v in sv["signed_meter_value"].items() if v is not None})
            if sv.get("measurand", ENERGY_MEASURAND) != ENERGY_MEASURAND or sv.get("phase"):
                continue
            if sv.get("location") not in (None, "Outlet", "Inlet"):
                continue
            value = sv.get("value")
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            unit = sv.get("unit_of_measure") or {}
            name, multiplier = unit.get("unit", "Wh"), unit.get("multiplier", 0)
            if not isinstance(multiplier, int) or not -3 <= multiplier <= 6:
                continue
            value = float(value) * 10.0**multiplier
            if name == "kWh":
                value *= 1000
            elif name != "Wh":
                continue
            if not math.isfinite(value):
                raise PropertyConstraintViolationError(description="an energy register must be a finite number")
            energy = check_wh(round(value), "an Energy.Active.Import.Register value")
        out.append(Reading(ts, energy, tuple(signed), raw=mv))
    return out


def last_energy(readings: list[Reading]) -> int | None:
    """The last register among `readings` (None if none carries one)."""
    for r in reversed(readings):
        if r.energy_wh is not None:
            return r.energy_wh
    return None


@dataclass
class _Unauthorised:
    """A transaction the station started before it had an idToken."""

    evse: int
    meter_start_wh: int | None
    ts_ms: int | None
    readings: list[Reading]


class V201Handler(OcppHandler, V201ChargePoint):
    """One OCPP 2.0.1 charging station's connection."""

    ERROR_CODES: dict[str, str] = {}  # the library's codes are 2.0.1's spelling
    KNOWN_ACTIONS = frozenset(a.value for a in Action)

    def __init__(self, charger_id: str, connection: Any, context: ChargerContext) -> None:
        super().__init__(charger_id, connection, context)
        self._unauthorised: OrderedDict[str, _Unauthorised] = OrderedDict()
        self._refused: OrderedDict[str, None] = OrderedDict()

    # --- provisioning, availability -----------------------------------------------------

    @on(Action.boot_notification)
    def on_boot_notification(self, charging_station: dict[str, Any], reason: str, **kwargs: Any) -> Any:
        info = {k: v for k, v in charging_station.items() if k != "modem"}
        self.bridge.booted(self.id, {"vendor": info.pop("vendor_name", None), **info, "reason": reason})
        return call_result.BootNotification(current_time=self._now(), interval=HEARTBEAT_INTERVAL, status="Accepted")

    @after(Action.boot_notification)
    def after_boot_notification(self, **kwargs: Any) -> None:
        self._sync_local_list_soon()

    @on(Action.heartbeat)
    def on_heartbeat(self, **kwargs: Any) -> Any:
        return call_result.Heartbeat(current_time=self._now())

    @after(Action.heartbeat)
    def after_heartbeat(self, **kwargs: Any) -> None:
        self._sync_local_list_soon()

    @on(Action.status_notification)
    def on_status_notification(
        self, timestamp: str, connector_status: str, evse_id: int, connector_id: int, **kwargs: Any
    ) -> Any:
        # Sessions name the EVSE (connector = EVSE id), so states are kept per EVSE too.
        self.bridge.connector_status(self.id, evse_id, connector_status, None, parse_time(timestamp))
        return call_result.StatusNotification()

    @on(Action.authorize)
    def on_authorize(self, id_token: dict[str, Any], **kwargs: Any) -> Any:
        token = _token_text(id_token)
        assert token is not None
        return call_result.Authorize(id_token_info=_id_token_info(self.bridge.authorize(token)))

    @on(Action.meter_values)
    def on_meter_values(self, evse_id: int, meter_value: list[Any], **kwargs: Any) -> Any:
        return call_result.MeterValues()

    @on(Action.notify_event)
    def on_notify_event(self, **kwargs: Any) -> Any:
        return call_result.NotifyEvent()

    @on(Action.security_event_notification)
    def on_security_event_notification(self, type: str, timestamp: str, **kwargs: Any) -> Any:
        log.info("station %s: security event %s", self.id, type)
        return call_result.SecurityEventNotification()

    @on(Action.firmware_status_notification)
    def on_firmware_status_notification(self, status: str, **kwargs: Any) -> Any:
        return call_result.FirmwareStatusNotification()

    @on(Action.log_status_notification)
    def on_log_status_notification(self, status: str, **kwargs: Any) -> Any:
        return call_result.LogStatusNotification()

    # --- transactions -------------------------------------------------------------------

    async def _handle_call(self, msg: Any) -> Any:
        """An Updated/Ended for a transaction not known here (yet) is refused before the
        library runs the handler (which would log the refusal as a failure of ours)."""
        if msg.action == Action.transaction_event and self._unknown_transaction(msg.payload):
            await validate_payload(msg, self._ocpp_version)  # bad input gets its own error first
            ref = msg.payload["transactionInfo"]["transactionId"]
            # After a failover its start may still be on its way from the node that died. A
            # 2.0.1 station sends a refused transaction message again, at most
            # TransactionMessageAttempts times (E04): the reading is delayed, not lost, and
            # the station's queue cannot be held for ever.
            raise InternalError(description=f"transaction {ref} is not known on this node (yet): send it again later")
        return await super()._handle_call(msg)

    def _unknown_transaction(self, payload: Any) -> bool:
        if not isinstance(payload, dict) or payload.get("eventType") not in ("Updated", "Ended"):
            return False
        info = payload.get("transactionInfo")
        ref = info.get("transactionId") if isinstance(info, dict) else None
        if not isinstance(ref, str) or ref in self._unauthorised or ref in self._refused:
            return False
        return self.bridge.find(self.id, transaction_ref=ref) is None

    @on(Action.transaction_event)
    async def on_transaction_event(
        self,
        event_type: str,
        timestamp: str,
        trigger_reason: str,
        seq_no: int,
        transaction_info: dict[str, Any],
        **kwargs: Any,
    ) -> Any:
        ref = check_token(transaction_info["transaction_id"], "transactionId")
        ts = parse_time(timestamp)
        readings = readings_of(kwargs.get("meter_value"))
        id_token = _token_text(kwargs.get("id_token"))
        evse = (kwargs.get("evse") or {}).get("id")
        status: AuthStatus | None = None
        log.debug("station %s: %s %s seq %d offline %s", self.id, event_type, ref, seq_no, kwargs.get("offline"))

        if event_type == "Started" or ref in self._unauthorised:
            pending = self._unauthorised.get(ref)
            if pending is None:
                # The start register is the Started event's first; any later sample is a reading.
                first = next((i for i, r in enumerate(readings) if r.energy_wh is not None), None)
                start_wh = readings[first].energy_wh if first is not None else None
                pending = _Unauthorised(evse or 0, start_wh, ts, readings[first + 1 :] if first is not None else [])
            else:
                pending.readings.extend(readings)
                if evse and not pending.evse:
                    pending.evse = evse
            if id_token is None:
                # No driver yet (a cable plugged in): wait for the idToken (bounded).
                if event_type == "Ended":
                    self._unauthorised.pop(ref, None)
                    log.info("station %s: transaction %s ended without an idToken: no session", self.id, ref)
                else:
                    self._unauthorised[ref] = pending
                    while len(self._unauthorised) > MAX_UNAUTHORISED:
                        self._unauthorised.popitem(last=False)
                return call_result.TransactionEvent()
            self._unauthorised.pop(ref, None)
            result = await self.context.run(
                self.bridge.start_transaction,
                self.id,
                pending.evse,
                id_token,
                pending.meter_start_wh,
                pending.ts_ms,
                transaction_ref=ref,
                reservation_id=kwargs.get("reservation_id"),
            )
            status = result.status
            if result.session_id is None:
                # Refused (live): the station is told so and does not charge; nothing stored.
                self._refused[ref] = None
                while len(self._refused) > MAX_REFUSED:
                    self._refused.popitem(last=False)
                return call_result.TransactionEvent(id_token_info=_id_token_info(status))
            # What is left to record: readings after the start register, then this event's own.
            readings = pending.readings
            if event_type == "Started":
                event_type = "Updated"

        if event_type == "Updated":
            if readings:
                await self.context.run(self.bridge.meter, self.id, readings, transaction_ref=ref)
        elif event_type == "Ended":
            stop = last_energy(readings)
            before = list(readings)
            stop_ts: int | None = ts
            signed: tuple[Any, ...] = ()
            if stop is not None:
                # The final register is the stop; the readings before it are meter events.
                idx = max(i for i, r in enumerate(readings) if r.energy_wh is not None)
                before = readings[:idx]
                signed = readings[idx].signed
                stop_ts = readings[idx].ts_ms
            await self.context.run(
                self.bridge.stop_transaction,
                self.id,
                stop,
                stop_ts,
                transaction_ref=ref,
                reason=transaction_info.get("stopped_reason") or trigger_reason,
                id_token=id_token,
                readings=before,
                signed=signed,
            )
        if id_token is not None and status is None:
            status = self.bridge.authorize(id_token)
        if status is not None:
            return call_result.TransactionEvent(id_token_info=_id_token_info(status))
        return call_result.TransactionEvent()

    @after(Action.transaction_event)
    def after_transaction_event(self, event_type: str, transaction_info: dict[str, Any], **kwargs: Any) -> None:
        ref = transaction_info["transaction_id"]
        if event_type != "Ended" and self.bridge.must_stop(self.id, transaction_ref=ref):
            self.spawn(self._request_stop(ref))

    async def _request_stop(self, ref: str) -> None:
        """The session reached the limits it was accepted with offline: ask the station to stop."""
        try:
            answer = await self.call(call.RequestStopTransaction(transaction_id=ref), suppress=False)
            log.info("station %s: transaction %s at its offline limit: stop %s", self.id, ref, answer.status)
        except Exception as exc:  # the station left, or refuses: its own Ended changes nothing anyway
            log.warning("station %s: could not stop transaction %s at its limit: %s", self.id, ref, exc)

    # --- local list -----------------------------------------------------------------

    async def _local_list_version(self) -> int:
        answer = await self.call(call.GetLocalListVersion(), suppress=False)
        return int(answer.version_number)

    async def _send_local_list(self, version: int, entries: list[tuple[str, AuthStatus]]) -> str:
        answer = await self.call(call.SendLocalList(**local_list_payload(version, entries)), suppress=False)
        return str(answer.status)


def local_list_payload(version: int, entries: list[tuple[str, AuthStatus]]) -> dict[str, Any]:
    """SendLocalList's fields for a full update with the site's lists (idTokens of type Central).

    An empty list is sent without ``localAuthorizationList`` (2.0.1's schema wants it
    non-empty when present): a full update with no entries empties the station's list.
    """
    payload: dict[str, Any] = {"version_number": version, "update_type": "Full"}
    if entries:
        payload["local_authorization_list"] = [
            {"id_token": {"id_token": tag, "type": "Central"}, "id_token_info": _id_token_info(status)}
            for tag, status in entries
        ]
    return payload


register_version(SUBPROTOCOL, V201Handler)


def remote_start_id(charger_id: str, id_token: str, nonce: str) -> int:
    """A positive 31-bit ``remoteStartId`` for a RequestStartTransaction (the station echoes it)."""
    digest = hashlib.sha256(f"remote-start\0{charger_id}\0{id_token}\0{nonce}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1) + 1


class V201Commands:
    """Commands from the node to a 2.0.1 station connected here (trio coroutines).

    Each returns the station's answer status (Accepted, Rejected, ...), or the value
    asked for. Raises what `OcppServer.call` raises (ChargerNotConnected, OCPPError,
    TimeoutError).
    """

    def __init__(self, server: OcppServer) -> None:
        self.server = server

    async def request_start(
        self, charger_id: str, id_token: str, evse_id: int | None = None, *, remote_id: int = 1, timeout: float = 30.0
    ) -> tuple[str, str | None]:
        """RequestStartTransaction; returns (status, the transaction id if the station named one)."""
        answer = await self.server.call(
            charger_id,
            call.RequestStartTransaction(
                id_token={"id_token": id_token, "type": "Central"}, remote_start_id=remote_id, evse_id=evse_id
            ),
            timeout=timeout,
        )
        return str(answer.status), answer.transaction_id

    async def request_stop(self, charger_id: str, transaction_id: str, *, timeout: float = 30.0) -> str:
        answer = await self.server.call(
            charger_id, call.RequestStopTransaction(transaction_id=transaction_id), timeout=timeout
        )
        return str(answer.status)

    async def get_local_list_version(self, charger_id: str) -> int:
        answer = await self.server.call(charger_id, call.GetLocalListVersion())
        return int(answer.version_number)

    async def send_local_list(self, charger_id: str) -> str:
        """Send the site's allowed/revoked lists as a full local list."""
        version, entries = self.server.bridge.local_list()
        answer = await self.server.call(charger_id, call.SendLocalList(**local_list_payload(version, entries)))
        return str(answer.status)

    async def set_network_profile(
        self, charger_id: str, slot: int, csms_url: str, *, security_profile: int = 1, message_timeout: int = 30
    ) -> str:
        """Give the station another central system (another node) in connection slot `slot`.

        The station tries its profiles in the priority order of its
        ``NetworkConfigurationPriority`` variable when its connection fails: this is
        how it learns the other nodes of the site (docs/ocpp.md, failover).
        """
        answer = await self.server.call(
            charger_id,
            call.SetNetworkProfile(
                configuration_slot=slot,
                connection_data={
                    "ocpp_version": "OCPP20",
                    "ocpp_transport": "JSON",
                    "ocpp_csms_url": csms_url,
                    "message_timeout": message_timeout,
                    "security_profile": security_profile,
                    "ocpp_interface": "Wired0",
                },
            ),
        )
        return str(answer.status)


__all__ = [
    "SUBPROTOCOL",
    "V201Commands",
    "V201Handler",
    "last_energy",
    "local_list_payload",
    "readings_of",
    "remote_start_id",
]
