"""The node's OCPP-J central system: a WebSocket server for the chargers pointed at this node.

A charge point connects to ``ws://BIND:PORT/ocpp/{charge_point_id}`` (`meshnode run
--ocpp-port`, default 9000, 0 = off) offering the subprotocol ``ocpp1.6`` and/or
``ocpp2.0.1``. The server:

- **negotiates the version** from `VERSIONS`, a registry ``subprotocol -> handler
  factory``, filled here by name (``ocpp1.6`` -> `_v16.py`, ``ocpp2.0.1`` -> `_v201.py`):
  a version's module, and the `ocpp` library with it, is imported when the first charger
  of that version connects. Of several offered, the newest we speak wins; none in
  common is refused at the upgrade (400);
- **authenticates at the upgrade** (OCPP Security Profile 1: HTTP Basic, user = the
  charge point id, which must equal the id in the path). On an enrolled node the
  charger must be registered in the replicated site config (`meshnode charger add`)
  and its password must match: otherwise 401, and nothing about the charger is kept.
  An unenrolled (`--insecure`) node accepts any charge point id without a password;
- **bounds what a charger can cost**: frames over `max_frame` bytes close the
  connection (1009, websockets' ``max_size``); each charger's messages pass a token
  bucket (`RateLimit`), so a flooding charger is slowed down to `rate` messages a
  second (its frames wait in the socket: TCP pushes back), not served faster at the
  expense of the others; unsolicited CALLRESULTs are dropped; at most `max_chargers`
  connections, at most `upgrades` logins a second (503 beyond); a second connection
  with the same charge point id replaces the first;
- **answers bad frames with the right CALLERROR** and keeps the connection
  (`_handler.OcppHandler.route_message`): not JSON / not an OCPP array -> FormationViolation
  (1.6; FormatViolation in 2.0.1), an action the version does not know ->
  NotImplemented, one it knows but we do not handle -> NotSupported, schema
  violations -> the library's TypeConstraint/PropertyConstraint/Occurrence/
  FormationViolation codes. Validation happens before any handler runs, so nothing is
  stored.

**Hosting.** The `ocpp` library (mobilityhouse) is asyncio: its `ChargePoint` reads a
connection's ``recv()``/``send()``, validates every message against the official JSON
schemas and routes it to ``@on(Action)`` handlers. The node is a trio program that
already hosts asyncio code (aiocoap, python-zeroconf) on one trio-asyncio loop
(`trio_asyncio.open_loop()` in `meshnode run`). The `websockets` asyncio server runs in
that same loop, so the library is used exactly as documented, with no second thread
and no second event loop; handlers reach the node's trio world (the bridge, the
services, the store) through ``trio_asyncio.trio_as_aio``, and the node's trio code
sends commands to a charger through ``trio_asyncio.aio_as_trio`` (`OcppServer.call`).
A trio WebSocket stack (trio-websocket) would have meant re-implementing the
library's call/response matching and routing; see docs/ocpp.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import hashlib
import importlib
import logging
import math
import os
import ssl
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

import trio
import trio_asyncio

from .._transport import LogBudget, held_back
from ..services import SiteConfigService
from ._bridge import OcppBridge

if TYPE_CHECKING:
    from ._handler import OcppHandler

log = logging.getLogger("meshnode.ocpp")

DEFAULT_PORT = 9000
PATH_PREFIX = "/ocpp/"
MAX_CHARGER_ID = 48
"""OCPP 2.0.1 limits the charging station identity to 48 characters; 1.6 chargers fit too."""
MAX_FRAME = 64 * 1024
"""Largest frame a charger may send (the biggest legitimate 1.6/2.0.1 message, a
StopTransaction with transactionData or a full local list, is well below)."""
CALL_TIMEOUT = 30.0
"""How long the node waits for a charger's answer to a command it sent."""


class HandlerFactory(Protocol):
    """Makes the handler of one connection for one OCPP version.

    Args:
        charger_id: the authenticated charge point id.
        connection: the websocket (``recv()``/``send()``), already rate-limited.
        context: the node side: bridge, server, how to run trio code.

    Returns:
        An `OcppHandler` (an `ocpp` ChargePoint), whose ``start()`` serves the connection.
    """

    def __call__(self, charger_id: str, connection: Any, context: ChargerContext) -> OcppHandler: ...


VERSIONS: dict[str, HandlerFactory] = {}
"""subprotocol -> handler factory (`register_version`)."""


class _ByName:
    """A version's handler factory given by name (``"._v16:V16Handler"``): its module, and with it
    the `ocpp` library's message classes and schemas for that version, is imported when the
    first charger of that version connects. An idle node, or one whose chargers all speak 1.6,
    does not hold the others (the `ocpp` library with both versions is ~4 MB of a node's memory).
    """

    def __init__(self, where: str) -> None:
        self.module, _, self.name = where.partition(":")

    def load(self) -> HandlerFactory:
        """Import the version's module; its handler class."""
        factory: HandlerFactory = getattr(importlib.import_module(self.module, __package__), self.name)
        return factory

    def __call__(self, charger_id: str, connection: Any, context: ChargerContext) -> OcppHandler:
        return self.load()(charger_id, connection, context)

    def __repr__(self) -> str:
        return f"<handler {self.module}:{self.name}, imported at first use>"


def register_version(subprotocol: str, factory: HandlerFactory | str) -> None:
    """Make the server speak one OCPP version (``ocpp1.6``, ``ocpp2.0.1``).

    `factory` is the handler class (or any `HandlerFactory`), or its name, ``"module:attr"``
    (module relative to this package), imported when a charger of that version first connects.
    """
    VERSIONS[subprotocol] = _ByName(factory) if isinstance(factory, str) else factory


# The versions a node speaks, by name: nothing of a version is imported before one of its
# chargers connects. Each version module registers its handler class itself when imported.
register_version("ocpp1.6", "._v16:V16Handler")
register_version("ocpp2.0.1", "._v201:V201Handler")


def _subprotocol_order(name: str) -> tuple[int, ...]:
    digits = name.removeprefix("ocpp")
    try:
        return tuple(int(p) for p in digits.split("."))
    except ValueError:
        return (0,)


@dataclass
class RateLimit:
    """A token bucket, sans-IO: `delay(now)` takes one token, returns how long to wait first.

    `rate` messages a second on average, bursts of `burst`. Waiting, not dropping: OCPP
    has no way to tell a charger "later" for a CALL, and a dropped CALL would be retried
    anyway.
    """

    rate: float = 50.0
    burst: float = 100.0
    _tokens: float = math.nan
    _last: float = 0.0

    def delay(self, now: float) -> float:
        if math.isnan(self._tokens):
            self._tokens, self._last = self.burst, now
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def try_take(self, now: float) -> bool:
        """Take a token if one is there (True); refuse without taking one (False)."""
        if self.delay(now) > 0:
            self._tokens += 1.0
            return False
        return True


class RateLimitedConnection:
    """What a handler reads from: a websocket whose ``recv`` obeys a `RateLimit`."""

    def __init__(self, ws: Any, limit: RateLimit) -> None:
        self.ws = ws
        self.limit = limit
        self.waited = 0.0

    async def recv(self) -> Any:
        message = await self.ws.recv()
        wait = self.limit.delay(asyncio.get_running_loop().time())
        if wait > 0:
            self.waited += wait
            await asyncio.sleep(wait)
        return message

    async def send(self, message: str) -> None:
        await self.ws.send(message)


@dataclass
class ChargerContext:
    """What a version handler may use: the bridge, the server, and a way into trio.

    `run(fn, *args)` runs a trio coroutine function from the handler's asyncio code
    (``trio_asyncio.trio_as_aio``) and returns its result.
    """

    bridge: OcppBridge
    server: OcppServer
    address: str | None

    async def run(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        return await trio_asyncio.trio_as_aio(fn)(*args, **kwargs)


# --- CALLERROR handling common to every version -------------------------------------------


BAD_FRAMES = LogBudget()
"""A charger can send refusable frames as fast as its rate limit lets it: each is
answered, counted here, and logged at most once per message template per 10 s."""


def _refused(logger: logging.Logger, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
    """Log a complaint about a charger's frame at a bounded rate (`BAD_FRAMES`): one line per
    logger and message template per interval, saying how many like it were held back."""
    held = BAD_FRAMES.allow((logger.name, msg), time.monotonic())
    if held is None:
        return
    if held:
        msg, args = msg + "%s", (*args, held_back(held, BAD_FRAMES.interval))
    logger.log(level, msg, *args, **kwargs)


class _BridgeLog(logging.Filter):
    """The bridge's warnings are about a charger's messages that passed the schema but cannot
    be recorded (meter values or a stop for an unknown transaction, a session not on this
    node): a charger can send them at will too, so they share `BAD_FRAMES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        held = BAD_FRAMES.allow((record.name, str(record.msg)), time.monotonic())
        if held is None:
            return False
        if held and isinstance(record.args, tuple):
            record.msg, record.args = f"{record.msg}%s", (*record.args, held_back(held, BAD_FRAMES.interval))
        return True


logging.getLogger("meshnode.ocpp.bridge").addFilter(_BridgeLog())


class _FrameLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The library logs every frame at INFO; here that is DEBUG (a meter value a minute per
    connector would fill the node's log). Its warnings and errors (a handler's refusal, a
    result nobody waits for: things a charger causes at will) are rate-limited."""

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.WARNING and self.isEnabledFor(level):
            _refused(self.logger, level, str(msg), *args, **kwargs)
        else:
            super().log(level, msg, *args, **kwargs)


FRAME_LOG = _FrameLog(logging.getLogger("meshnode.ocpp.frames"), {})


def parse_time(text: Any) -> int | None:
    """An OCPP timestamp (RFC 3339, e.g. ``2026-11-27T21:00:00Z``) in ms since the epoch; None if unreadable."""
    if not isinstance(text, str) or len(text) > 40:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


def format_time(ms: float) -> str:
    """ms since the epoch as an OCPP timestamp (UTC, ms precision, ``Z``)."""
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# --- authentication ------------------------------------------------------------------------


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an ``Authorization: Basic`` header, None if absent or malformed."""
    if not header or not header[:6].lower() == "basic ":
        return None
    try:
        user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def charger_id_from_path(path: str) -> str | None:
    """The charge point id of ``/ocpp/{id}`` (percent-decoded), None if the path is not one."""
    path = path.split("?", 1)[0]
    if not path.startswith(PATH_PREFIX):
        return None
    cid = urllib.parse.unquote(path[len(PATH_PREFIX) :])
    if not cid or len(cid) > MAX_CHARGER_ID or "/" in cid or ":" in cid or not cid.isprintable():
        return None
    return cid


class Authenticator:
    """Decides the upgrade: may this charge point id log in with these credentials?

    Verified passwords are remembered (a hash of the password against the registration it
    matched), so a charger that reconnects often costs one scrypt, not one per connection.
    """

    CACHE = 1024

    def __init__(self, site_config: SiteConfigService) -> None:
        self.site_config = site_config
        self._good: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()

    @property
    def open(self) -> bool:
        """An unenrolled node accepts any charge point (labs only: `--insecure`)."""
        return self.site_config.identity is None

    async def check(self, charger_id: str, credentials: tuple[str, str] | None) -> str | None:
        """None if the charger may connect, else why not (for the log; the charger gets 401)."""
        if self.open:
            return None
        if credentials is None:
            return "no HTTP Basic credentials"
        user, password = credentials
        if user != charger_id:
            return f"Basic user {user!r} is not the charge point id"
        reg = self.site_config.charger(charger_id)
        if reg is None:
            return "not registered on this site"
        key = (charger_id, hashlib.sha256(password.encode()).digest())
        if self._good.get(key) == reg.hash:
            return None
        ok = await asyncio.get_running_loop().run_in_executor(None, reg.check_password, password)
        if not ok:
            return "wrong password"
        self._good[key] = reg.hash
        while len(self._good) > self.CACHE:
            self._good.popitem(last=False)
        return None


# --- the server ----------------------------------------------------------------------------


class ChargerNotConnected(Exception):
    """The node has no connection to that charger (it may be connected to another node)."""


class OcppServer:
    """The chargers connected to this node, and the WebSocket server they connect to.

    Args:
        bridge: the path into the session documents.
        site_config: the registrations (authentication).
        max_frame: largest frame accepted (bytes); bigger closes the connection.
        rate, burst: each charger's message rate limit.
        max_chargers: connections served at once.
        ssl_context: serve ``wss://`` (OCPP Security Profile 2: TLS, then the same HTTP
            Basic login) instead of ``ws://``.
        upgrades: how many WebSocket upgrades (logins) the node takes a second, from
            anyone: beyond it, 503 before any work (a password check costs an scrypt).
    """

    def __init__(
        self,
        bridge: OcppBridge,
        site_config: SiteConfigService,
        *,
        max_frame: int = MAX_FRAME,
        rate: float = 50.0,
        burst: float = 100.0,
        max_chargers: int = 512,
        ssl_context: ssl.SSLContext | None = None,
        upgrades: RateLimit | None = None,
    ) -> None:
        self.bridge = bridge
        self.auth = Authenticator(site_config)
        self.max_frame = max_frame
        self.rate = rate
        self.burst = burst
        self.max_chargers = max_chargers
        self.ssl_context = ssl_context
        self.upgrades = upgrades or RateLimit(rate=20.0, burst=50.0)
        self.handlers: dict[str, OcppHandler] = {}
        self.address: tuple[str, int] | None = None
        self.counters = {"refused": 0, "connections": 0}

    # trio side ------------------------------------------------------------------------

    async def serve(
        self, bind: str, port: int, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve chargers on ``bind:port`` until cancelled (needs a trio-asyncio loop open).

        `task_status.started` gets the bound (address, port) (port 0 picks a free one).
        """
        started = trio.Event()

        async def aio_serve() -> None:
            from websockets.asyncio.server import serve

            subprotocols = sorted(VERSIONS, key=_subprotocol_order, reverse=True)
            try:
                opened = serve(
                    self._connection,
                    bind,
                    port,
                    subprotocols=subprotocols,  # type: ignore[arg-type]
                    process_request=self._upgrade,
                    max_size=self.max_frame,
                    max_queue=4,
                    ping_interval=60,
                    ping_timeout=60,
                    server_header=None,
                    ssl=self.ssl_context,
                )
                server = await opened.__aenter__()
            except OSError as exc:  # the port is taken, the address is not ours: one clear line
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                raise OSError(exc.errno, f"cannot serve OCPP on {bind}:{port}: {why}") from exc
            try:
                sock = next(iter(server.sockets))
                self.address = sock.getsockname()[:2]
                started.set()
                await asyncio.Future()
            finally:
                await opened.__aexit__(None, None, None)

        with reraise_sole_oserror():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio_asyncio.aio_as_trio(aio_serve))
                await started.wait()
                assert self.address is not None
                log.info("OCPP central system on %s{id} (%s)", self.url, ", ".join(VERSIONS))
                task_status.started(self.address)

    @property
    def url(self) -> str:
        """What chargers are configured with (they append their id); valid once serving."""
        assert self.address is not None
        return f"{'wss' if self.ssl_context else 'ws'}://{self.address[0]}:{self.address[1]}{PATH_PREFIX}"

    async def call(self, charger_id: str, payload: Any, *, timeout: float = CALL_TIMEOUT) -> Any:
        """Send a command (an ``ocpp.v16.call.*`` / ``ocpp.v201.call.*`` payload) to a charger
        connected here, from trio code; returns the charger's answer (the library's
        call_result object).

        Raises:
            ChargerNotConnected: it is not connected to this node.
            OCPPError: the charger answered with a CALLERROR.
            TimeoutError: no answer within `timeout`.
        """
        handler = self.handlers.get(charger_id)
        if handler is None:
            raise ChargerNotConnected(f"charger {charger_id!r} is not connected to this node")

        async def aio_call() -> Any:
            return await asyncio.wait_for(handler.call(payload, suppress=False), timeout)

        try:
            return await trio_asyncio.aio_as_trio(aio_call)()
        except TimeoutError as exc:
            raise TimeoutError(f"charger {charger_id!r} did not answer {type(payload).__name__}") from exc

    def status_json(self) -> list[dict[str, Any]]:
        return self.bridge.status_json()

    # asyncio side ---------------------------------------------------------------------

    async def _upgrade(self, connection: Any, request: Any) -> Any:
        if not self.upgrades.try_take(asyncio.get_running_loop().time()):
            self.counters["refused"] += 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connection attempts, retry later\n")
        charger_id = charger_id_from_path(request.path)
        if charger_id is None:
            self.counters["refused"] += 1
            return connection.respond(HTTPStatus.NOT_FOUND, "connect to /ocpp/{charge point id}\n")
        if len(self.handlers) >= self.max_chargers and charger_id not in self.handlers:
            self.counters["refused"] += 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many chargers on this node\n")
        why = await self.auth.check(charger_id, parse_basic(request.headers.get("Authorization")))
        if why is not None:
            self.counters["refused"] += 1
            log.warning("charger %s from %s refused: %s", charger_id, _peer(connection), why)
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "unknown charger or wrong password\n")
            response.headers["WWW-Authenticate"] = 'Basic realm="meshnode OCPP", charset="UTF-8"'
            return response
        return None

    async def _connection(self, ws: Any) -> None:
        charger_id = charger_id_from_path(ws.request.path)
        factory = VERSIONS.get(ws.subprotocol or "")
        if charger_id is None or factory is None:
            await ws.close(1002, "no OCPP subprotocol negotiated")
            return
        if isinstance(factory, _ByName):
            # The first charger of its version: the import (0.2-0.8 s on a small machine) runs
            # in a worker thread, so the node's loop keeps serving meanwhile.
            factory = await asyncio.get_running_loop().run_in_executor(None, factory.load)
        previous = self.handlers.get(charger_id)
        if previous is not None:
            log.info("charger %s connected again: closing its previous connection", charger_id)
            await previous._connection.ws.close(1000, "replaced by a new connection")
        context = ChargerContext(self.bridge, self, _peer(ws))
        handler = factory(charger_id, RateLimitedConnection(ws, RateLimit(self.rate, self.burst)), context)
        self.handlers[charger_id] = handler
        self.counters["connections"] += 1
        self.bridge.connected(charger_id, ws.subprotocol, context.address)
        log.info("charger %s connected from %s (%s)", charger_id, context.address, ws.subprotocol)
        try:
            await handler.start()
        except Exception as exc:  # ConnectionClosed (any kind) ends the charger's session here
            log.info("charger %s disconnected: %s", charger_id, exc)
        finally:
            handler.cancel_tasks()
            if self.handlers.get(charger_id) is handler:
                del self.handlers[charger_id]
                self.bridge.disconnected(charger_id)


@contextlib.contextmanager
def reraise_sole_oserror() -> Iterator[None]:
    """An exception group (trio's nurseries wrap what their tasks raise) whose only error is
    an OSError is raised as that OSError: `meshnode run` reports an OCPP port it cannot bind
    in one line, like its other start-up errors, instead of a traceback."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        pending: list[BaseException] = [group]
        while pending:
            exc = pending.pop()
            if isinstance(exc, BaseExceptionGroup):
                pending.extend(exc.exceptions)
            else:
                leaves.append(exc)
        if len(leaves) == 1 and isinstance(leaves[0], OSError):
            raise leaves[0] from None
        raise


def _peer(connection: Any) -> str | None:
    try:
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return None


__all__ = [
    "DEFAULT_PORT",
    "BAD_FRAMES",
    "FRAME_LOG",
    "MAX_FRAME",
    "VERSIONS",
    "Authenticator",
    "ChargerContext",
    "ChargerNotConnected",
    "HandlerFactory",
    "OcppServer",
    "RateLimit",
    "RateLimitedConnection",
    "charger_id_from_path",
    "format_time",
    "parse_time",
    "parse_basic",
    "register_version",
]
