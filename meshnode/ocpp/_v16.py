"""OCPP 1.6J: Core and Local Auth List Management, as translations into bridge calls.

Charger -> node (``@on`` handlers): BootNotification, Heartbeat, StatusNotification,
Authorize, StartTransaction, MeterValues, StopTransaction (with transactionData),
DataTransfer (refused politely: UnknownVendorId), and the acknowledgements
DiagnosticsStatusNotification / FirmwareStatusNotification.

Node -> charger (`V16Commands`, trio): RemoteStartTransaction, RemoteStopTransaction,
ChangeAvailability, Reset, TriggerMessage, GetConfiguration, ChangeConfiguration,
GetLocalListVersion, SendLocalList. After a BootNotification and on every Heartbeat
the node compares the charger's local list version with the site's lists and sends a
full list when they differ, so the charger can authorise drivers by itself when even
its node is gone (it still needs LocalAuthListEnabled and LocalAuthorizeOffline set).

Nothing here decides anything about sessions: every rule (authorisation, exactly-once,
transaction ids) is the bridge's. The 1.6 specifics handled here:

- energy: ``Energy.Active.Import.Register`` samples (the default measurand), total
  (no phase), in Wh or kWh, become readings; other measurands are not session events.
  Values with ``format: SignedData`` are kept verbatim in the event's data.
- ``transactionId`` is the bridge's derived 31-bit integer.
- CALLERROR codes use 1.6's spelling (FormationViolation, OccurenceConstraintViolation).
"""

from __future__ import annotations

import logging
from typing import Any

from ocpp.routing import after, on
from ocpp.v16 import ChargePoint as V16ChargePoint
from ocpp.v16 import call, call_result
from ocpp.v16.datatypes import AuthorizationData, IdTagInfo
from ocpp.v16.enums import Action, AuthorizationStatus, RegistrationStatus, UpdateType

from ._bridge import AuthStatus, Reading
from ._handler import OcppHandler, check_token, check_wh
from ._server import ChargerContext, OcppServer, parse_time, register_version

log = logging.getLogger("meshnode.ocpp.v16")

SUBPROTOCOL = "ocpp1.6"
HEARTBEAT_INTERVAL = 60
"""Seconds between heartbeats we ask for in BootNotification.conf."""
ENERGY_MEASURAND = "Energy.Active.Import.Register"


def _id_tag_info(status: AuthStatus) -> IdTagInfo:
    return IdTagInfo(status=AuthorizationStatus(status.value))


def readings_of(meter_value: Any) -> list[Reading]:
    """Bridge readings from a 1.6 ``meterValue`` list (already schema-checked).

    One reading per MeterValue that carries a total import register; its signed
    values (``format: SignedData``) are kept, whatever their measurand.
    """
    out = []
    for mv in meter_value or []:
        ts = parse_time(mv.get("timestamp"))
        if ts is None:
            continue
        energy: int | None = None
        signed = []
        for sv in mv.get("sampled_value") or []:
            if sv.get("format") == "SignedData":
                signed.append({k: v for k, v in sv.items() if v is not None})
                continue
            if sv.get("measurand", ENERGY_MEASURAND) != ENERGY_MEASURAND or sv.get("phase"):
                continue
            if sv.get("location") not in (None, "Outlet", "Inlet"):
                continue
            try:
                value = float(sv.get("value"))
            except (TypeError, ValueError):
                continue
            unit = sv.get("unit", "Wh")
            if unit == "kWh":
                value *= 1000
            elif unit != "Wh" or not 0 <= value < 2**53:
                continue
            energy = round(value)
        out.append(Reading(ts, energy, tuple(signed), raw=mv))
    return out


class V16Handler(OcppHandler, V16ChargePoint):
    """One OCPP 1.6 charger's connection."""

    ERROR_CODES = {
        "FormatViolation": "FormationViolation",
        "OccurrenceConstraintViolation": "OccurenceConstraintViolation",
    }
    KNOWN_ACTIONS = frozenset(a.value for a in Action)

    def __init__(self, charger_id: str, connection: Any, context: ChargerContext) -> None:
        super().__init__(charger_id, connection, context)

    @on(Action.boot_notification)
    def on_boot_notification(self, charge_point_vendor: str, charge_point_model: str, **kwargs: Any) -> Any:
        self.bridge.booted(self.id, {"vendor": charge_point_vendor, "model": charge_point_model, **kwargs})
        return call_result.BootNotification(
            current_time=self._now(), interval=HEARTBEAT_INTERVAL, status=RegistrationStatus.accepted
        )

    @after(Action.boot_notification)
    def after_boot_notification(self, **kwargs: Any) -> None:
        self._sync_local_list_soon()

    @on(Action.heartbeat)
    def on_heartbeat(self) -> Any:
        return call_result.Heartbeat(current_time=self._now())

    @after(Action.heartbeat)
    def after_heartbeat(self) -> None:
        self._sync_local_list_soon()

    @on(Action.status_notification)
    def on_status_notification(self, connector_id: int, error_code: str, status: str, **kwargs: Any) -> Any:
        self.bridge.connector_status(self.id, connector_id, status, error_code, parse_time(kwargs.get("timestamp")))
        return call_result.StatusNotification()

    @on(Action.authorize)
    def on_authorize(self, id_tag: str) -> Any:
        return call_result.Authorize(id_tag_info=_id_tag_info(self.bridge.authorize(check_token(id_tag, "idTag"))))

    @on(Action.start_transaction)
    async def on_start_transaction(
        self, connector_id: int, id_tag: str, meter_start: int, timestamp: str, **kwargs: Any
    ) -> Any:
        result = await self.context.run(
            self.bridge.start_transaction,
            self.id,
            connector_id,
            check_token(id_tag, "idTag"),
            check_wh(meter_start, "meterStart"),
            parse_time(timestamp),
            reservation_id=kwargs.get("reservation_id"),
        )
        return call_result.StartTransaction(
            transaction_id=result.transaction_id, id_tag_info=_id_tag_info(result.status)
        )

    @on(Action.meter_values)
    async def on_meter_values(self, connector_id: int, meter_value: list[Any], **kwargs: Any) -> Any:
        transaction_id = kwargs.get("transaction_id")
        if transaction_id is not None:
            await self.context.run(
                self.bridge.meter,
                self.id,
                readings_of(meter_value),
                transaction_id=transaction_id,
                connector=connector_id,
            )
        return call_result.MeterValues()

    @after(Action.meter_values)
    def after_meter_values(self, connector_id: int, meter_value: list[Any], **kwargs: Any) -> None:
        transaction_id = kwargs.get("transaction_id")
        if transaction_id is not None and self.bridge.must_stop(self.id, transaction_id):
            self.spawn(self._remote_stop(transaction_id))

    async def _remote_stop(self, transaction_id: int) -> None:
        """The session reached the limits it was accepted with offline: ask the charger to stop."""
        try:
            answer = await self.call(call.RemoteStopTransaction(transaction_id=transaction_id), suppress=False)
            log.info("charger %s: transaction %d at its offline limit: stop %s", self.id, transaction_id, answer.status)
        except Exception as exc:
            log.warning("charger %s: could not stop transaction %d at its limit: %s", self.id, transaction_id, exc)

    @on(Action.stop_transaction)
    async def on_stop_transaction(self, meter_stop: int, timestamp: str, transaction_id: int, **kwargs: Any) -> Any:
        check_wh(meter_stop, "meterStop")
        if kwargs.get("id_tag") is not None:
            check_token(kwargs["id_tag"], "idTag")
        readings = readings_of(kwargs.get("transaction_data"))
        # The stop's own signed values (a charger may sign only the final reading) ride on the stop.
        final_signed: tuple[Any, ...] = ()
        if readings and readings[-1].energy_wh is None:
            final_signed = readings[-1].signed
        id_tag = kwargs.get("id_tag")
        await self.context.run(
            self.bridge.stop_transaction,
            self.id,
            meter_stop,
            parse_time(timestamp),
            transaction_id=transaction_id,
            reason=kwargs.get("reason"),
            id_token=id_tag,
            readings=readings,
            signed=final_signed,
        )
        if id_tag is None:
            return call_result.StopTransaction()
        return call_result.StopTransaction(id_tag_info=_id_tag_info(self.bridge.authorize(id_tag)))

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id: str, **kwargs: Any) -> Any:
        log.info("charger %s: DataTransfer from vendor %r refused", self.id, vendor_id)
        return call_result.DataTransfer(status="UnknownVendorId")

    @on(Action.diagnostics_status_notification)
    def on_diagnostics_status_notification(self, status: str) -> Any:
        return call_result.DiagnosticsStatusNotification()

    @on(Action.firmware_status_notification)
    def on_firmware_status_notification(self, status: str) -> Any:
        return call_result.FirmwareStatusNotification()

    # --- local list -----------------------------------------------------------------

    async def _local_list_version(self) -> int:
        answer = await self.call(call.GetLocalListVersion(), suppress=False)
        return int(answer.list_version)

    async def _send_local_list(self, version: int, entries: list[tuple[str, AuthStatus]]) -> str:
        answer = await self.call(call.SendLocalList(**local_list_payload(version, entries)), suppress=False)
        return str(answer.status)


def local_list_payload(version: int, entries: list[tuple[str, AuthStatus]]) -> dict[str, Any]:
    """SendLocalList's fields for a full update with the site's lists."""
    return {
        "list_version": version,
        "update_type": UpdateType.full,
        "local_authorization_list": [
            AuthorizationData(id_tag=tag, id_tag_info=_id_tag_info(status)) for tag, status in entries
        ],
    }


register_version(SUBPROTOCOL, V16Handler)


class V16Commands:
    """Commands from the node to a 1.6 charger connected here (trio coroutines).

    Each returns the charger's answer status (a string: Accepted, Rejected, ...), or
    the answer object for the Get* commands. Raises what `OcppServer.call` raises.
    """

    def __init__(self, server: OcppServer) -> None:
        self.server = server

    async def remote_start(self, charger_id: str, id_tag: str, connector_id: int | None = None) -> str:
        answer = await self.server.call(
            charger_id, call.RemoteStartTransaction(id_tag=id_tag, connector_id=connector_id)
        )
        return str(answer.status)

    async def remote_stop(self, charger_id: str, transaction_id: int) -> str:
        answer = await self.server.call(charger_id, call.RemoteStopTransaction(transaction_id=transaction_id))
        return str(answer.status)

    async def change_availability(self, charger_id: str, connector_id: int, available: bool) -> str:
        kind = "Operative" if available else "Inoperative"
        answer = await self.server.call(charger_id, call.ChangeAvailability(connector_id=connector_id, type=kind))
        return str(answer.status)

    async def reset(self, charger_id: str, hard: bool = False) -> str:
        answer = await self.server.call(charger_id, call.Reset(type="Hard" if hard else "Soft"))
        return str(answer.status)

    async def trigger(self, charger_id: str, message: str, connector_id: int | None = None) -> str:
        answer = await self.server.call(
            charger_id, call.TriggerMessage(requested_message=message, connector_id=connector_id)
        )
        return str(answer.status)

    async def get_configuration(self, charger_id: str, keys: list[str] | None = None) -> Any:
        return await self.server.call(charger_id, call.GetConfiguration(key=keys))

    async def change_configuration(self, charger_id: str, key: str, value: str) -> str:
        answer = await self.server.call(charger_id, call.ChangeConfiguration(key=key, value=value))
        return str(answer.status)

    async def get_local_list_version(self, charger_id: str) -> int:
        answer = await self.server.call(charger_id, call.GetLocalListVersion())
        return int(answer.list_version)

    async def send_local_list(self, charger_id: str) -> str:
        """Send the site's allowed/revoked lists as a full local list."""
        version, entries = self.server.bridge.local_list()
        answer = await self.server.call(charger_id, call.SendLocalList(**local_list_payload(version, entries)))
        return str(answer.status)


__all__ = ["SUBPROTOCOL", "V16Commands", "V16Handler", "local_list_payload", "readings_of"]
