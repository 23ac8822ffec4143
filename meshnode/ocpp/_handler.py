"""The base of the OCPP version handlers: the `ocpp` library's ChargePoint plus the node's rules
for bad input (which CALLERROR a frame deserves) and the local list sync both versions share.

Only a version module (`_v16.py`, `_v201.py`) imports this, and a version module is imported
when the first charger of that version connects (`_server.register_version` by name): this
module is where the `ocpp` library and its JSON schema validation come in.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
from typing import Any

from jsonschema.exceptions import ValidationError as SchemaError
from ocpp.charge_point import ChargePoint
from ocpp.exceptions import (
    FormatViolationError,
    NotSupportedError,
    OccurrenceConstraintViolationError,
    OCPPError,
    PropertyConstraintViolationError,
    TypeConstraintViolationError,
)
from ocpp.exceptions import NotImplementedError as OcppNotImplemented
from ocpp.messages import Call, CallError, MessageType, get_validator, unpack

from ._bridge import AuthStatus
from ._server import CALL_TIMEOUT, FRAME_LOG, ChargerContext, _refused, format_time

log = logging.getLogger("meshnode.ocpp")


class OcppHandler(ChargePoint, abc.ABC):
    """Base of the version handlers: the `ocpp` ChargePoint plus the node's bad-input rules.

    A subclass (`_v16.V16Handler`, `_v201.V201Handler`) adds ``@on(Action)`` methods that
    translate into bridge calls, nothing else, and sets `ERROR_CODES` for its version's
    spelling of the CALLERROR codes.
    """

    ERROR_CODES: dict[str, str] = {}
    """The library's code -> this version's code (1.6 spells FormationViolation and
    OccurenceConstraintViolation; the library uses the 2.0.1 names)."""
    KNOWN_ACTIONS: frozenset[str] = frozenset()
    """Every action of this version (from the library's enums): routed -> handled; known
    but not routed -> NotSupported; unknown -> NotImplemented."""

    def __init__(self, charger_id: str, connection: Any, context: ChargerContext) -> None:
        super().__init__(charger_id, connection, response_timeout=CALL_TIMEOUT, logger=FRAME_LOG)
        self.context = context
        self.bridge = context.bridge
        self.errors_sent = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.list_version_sent: int | None = None
        self._list_sync: asyncio.Task[None] | None = None

    def _now(self) -> str:
        return format_time(self.bridge._now_ms())

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run a call to the charger beside the reader (a remote stop, a local list sync); it
        ends with the connection (`cancel_tasks`), not after its answer timeout."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # --- local list (both versions; the subclass spells the two calls) -------------------

    @abc.abstractmethod
    async def _local_list_version(self) -> int:
        """Ask the charger for its local list's version (GetLocalListVersion)."""

    @abc.abstractmethod
    async def _send_local_list(self, version: int, entries: list[tuple[str, AuthStatus]]) -> str:
        """Send a full SendLocalList; return the charger's status."""

    def _sync_local_list_soon(self) -> None:
        version, _ = self.bridge.local_list()
        if version == self.list_version_sent or (self._list_sync is not None and not self._list_sync.done()):
            return
        self._list_sync = self.spawn(self._sync_local_list())

    async def _sync_local_list(self) -> None:
        """Send the site's lists when the charger's local list differs (errors are logged).

        A refusal is logged and not retried at every heartbeat: the next change of the
        site's lists (a new version) is tried again.
        """
        try:
            version, entries = self.bridge.local_list()
            if await self._local_list_version() != version:
                status = await self._send_local_list(version, entries)
                if status != "Accepted":
                    log.info("charger %s: SendLocalList %s", self.id, status)
            self.list_version_sent = version
        except Exception as exc:  # a charger without the feature answers NotSupported; or it left
            log.info("charger %s: local list not updated: %s", self.id, exc)
            self.list_version_sent = self.bridge.local_list()[0]

    def _code(self, exc: OCPPError) -> str:
        return self.ERROR_CODES.get(exc.code, exc.code)

    async def _send_error(self, unique_id: str, exc: OCPPError) -> None:
        self.errors_sent += 1
        description = exc.description if isinstance(exc.description, str) else ""
        details = exc.details if isinstance(exc.details, dict) else {}
        details = {k: v for k, v in details.items() if k != "ocpp_message"}
        error = CallError(unique_id, self._code(exc), description[:255], json.loads(json.dumps(details, default=str)))
        await self._send(error.to_json())

    async def route_message(self, raw_msg: Any) -> None:
        """Parse one frame; CALL -> handler, CALLRESULT/CALLERROR -> the waiting `call`.

        Unlike the library (which only logs), a frame that is not an OCPP message gets a
        CALLERROR, with the message id when one can be read, else "-1" (OCPP 2.0.1
        section 4.2.3; 1.6 has no rule, the same is done).
        """
        self.bridge.seen(self.id)
        if not isinstance(raw_msg, str):
            _refused(log, logging.WARNING, "charger %s: binary frame (OCPP-J uses text frames)", self.id)
            await self._send_error("-1", FormatViolationError(description="OCPP-J messages are text frames"))
            return
        try:
            msg = unpack(raw_msg)
        except OCPPError as exc:
            _refused(log, logging.WARNING, "charger %s: bad frame: %s", self.id, exc)
            unique_id = _message_id(raw_msg)
            if isinstance(exc, FormatViolationError) or exc.code in ("ProtocolError", "PropertyConstraintViolation"):
                exc = FormatViolationError(description=str(exc.details.get("cause", "not an OCPP message"))[:200])
            await self._send_error(unique_id, exc)
            return
        if msg.message_type_id == MessageType.Call:
            await self._route_call(msg)
        elif msg.message_type_id in (MessageType.CallResult, MessageType.CallError):
            if not self._call_lock.locked():
                _refused(log, logging.WARNING, "charger %s: unsolicited %s dropped", self.id, type(msg).__name__)
                return
            self._response_queue.put_nowait(msg)

    async def _route_call(self, msg: Call) -> None:
        if not isinstance(msg.action, str) or not isinstance(msg.unique_id, str) or not isinstance(msg.payload, dict):
            await self._send_error(
                str(msg.unique_id) if isinstance(msg.unique_id, str | int) else "-1",
                FormatViolationError(description="a CALL is [2, id (string), action (string), payload (object)]"),
            )
            return
        if msg.action not in self.route_map:
            if msg.action in self.KNOWN_ACTIONS:
                exc: OCPPError = NotSupportedError(description=f"{msg.action} is not supported by this node")
            else:
                exc = OcppNotImplemented(description=f"{msg.action} is not an action of this OCPP version")
            _refused(log, logging.WARNING, "charger %s: %s", self.id, exc.description)
            await self._send_error(msg.unique_id, exc)
            return
        violation = self.schema_violation(msg)
        if violation is not None:
            _refused(
                log, logging.WARNING, "charger %s: %s refused: %s %s",
                self.id, msg.action, violation.code, violation.description,
            )  # fmt: skip
            await self._send_error(msg.unique_id, violation)
            return
        try:
            await self._handle_call(msg)
        except OCPPError as exc:
            _refused(log, logging.WARNING, "charger %s: %s refused: %s %s", self.id, msg.action, exc.code, exc.details)
            await self._send_error(msg.unique_id, exc)

    def schema_violation(self, msg: Call) -> OCPPError | None:
        """The CALLERROR a CALL's payload deserves under its action's JSON schema, or None.

        The library validates too, but names every violation but a wrong type a
        "FormatViolation"; OCPP distinguishes (1.6 section 4.2.3, 2.0.1 part 4 section 4.3):
        a field of the wrong type or length -> TypeConstraintViolation, a required field
        missing -> OccurrenceConstraintViolation, a value outside its enumeration or range ->
        PropertyConstraintViolation, an unknown field or anything else -> FormatViolation.
        """
        try:
            validator = get_validator(MessageType.Call, msg.action, self._ocpp_version)
        except (OSError, ValueError):
            return None  # no schema: the library's own answer stands
        error = next(iter(sorted(validator.iter_errors(msg.payload), key=lambda e: list(map(str, e.path)))), None)
        if error is None:
            return None
        return _violation(error)

    async def _send(self, message: str) -> None:
        # The library answers a handler's exception itself, as InternalError or with the
        # OCPPError's code: rewrite the code to this version's spelling.
        if self.ERROR_CODES and message.startswith(f"[{MessageType.CallError},"):
            try:
                frame = json.loads(message)
                frame[2] = self.ERROR_CODES.get(frame[2], frame[2])
                message = json.dumps(frame, separators=(",", ":"))
            except (ValueError, IndexError, TypeError):
                pass
        await self._connection.send(message)


MAX_WH = 2**53
"""Largest meter register accepted (Wh), as in the HTTP API."""


def check_wh(value: int, field: str) -> int:
    """A meter register (Wh) from a message: 0 .. 2^53, else PropertyConstraintViolation."""
    if not 0 <= value <= MAX_WH:
        raise PropertyConstraintViolationError(description=f"{field} must be a register reading from 0 to 2^53 Wh")
    return value


def check_token(value: str, field: str) -> str:
    """An id token from a message: printable, else PropertyConstraintViolation (it is stored)."""
    if not value or not value.isprintable():
        raise PropertyConstraintViolationError(description=f"{field} must be printable")
    return value


_VIOLATIONS: dict[str, type[OCPPError]] = {
    "type": TypeConstraintViolationError,
    "maxLength": TypeConstraintViolationError,
    "minLength": TypeConstraintViolationError,
    "required": OccurrenceConstraintViolationError,
    "minItems": OccurrenceConstraintViolationError,
    "maxItems": OccurrenceConstraintViolationError,
    "enum": PropertyConstraintViolationError,
    "minimum": PropertyConstraintViolationError,
    "maximum": PropertyConstraintViolationError,
    "multipleOf": PropertyConstraintViolationError,
    "format": PropertyConstraintViolationError,
    "pattern": PropertyConstraintViolationError,
}


def _violation(error: SchemaError) -> OCPPError:
    where = "/".join(str(p) for p in error.absolute_path) or "payload"
    cls = _VIOLATIONS.get(str(error.validator), FormatViolationError)
    return cls(description=f"{where}: {error.message}"[:255])


def _message_id(raw: Any) -> str:
    try:
        frame = json.loads(raw)
    except (ValueError, TypeError):
        return "-1"
    if isinstance(frame, list) and len(frame) > 1 and isinstance(frame[1], str) and len(frame[1]) <= 36:
        return frame[1]
    return "-1"


__all__ = ["MAX_WH", "OcppHandler", "check_token", "check_wh"]
