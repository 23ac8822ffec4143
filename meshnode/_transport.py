"""The Transport seam: request/response of opaque bytes between nodes.

A node talks to its neighbours only through a :class:`Transport`: it sends a
request (``peer``, ``resource``, ``payload``) and gets the response payload back,
and it registers handlers that answer requests from others. The transport knows
no meaning: payloads are bytes (CBOR encoded by the caller), resources are paths.
Two implementations share this module's vocabulary:

- :mod:`meshnode._coap`: CoAP over UDP (RFC 7252) with block-wise transfer
  (RFC 7959), hosted in the trio run with trio-asyncio.
- :class:`MemoryTransport` on a :class:`MemoryNetwork`: an in-memory fake for
  tests and the simulator. It carries bytes only and loses requests the way UDP
  does (silence, then a timeout), so code written against it behaves the same
  on the wire.

Both run incoming requests through one :class:`Dispatcher`, so the mapping from
what a handler did to the response code cannot drift between the two:

====================================  =====================================
handler outcome                       response (RFC 7252 section 5.9)
====================================  =====================================
returns bytes                         2.05 Content (GET) / 2.04 Changed (POST)
raises :class:`BadRequest`            4.00, payload = UTF-8 message
raises :class:`Unauthorized`          4.01
raises :class:`Forbidden`             4.03
no route for the path                 4.04 (:class:`NotFound`)
path known, method not routed         4.05 (:class:`MethodNotAllowed`)
request payload > ``max_payload``     4.13, handler not called (RFC 7959 s2.9.3)
raises any other exception            5.00, logged at ERROR with traceback
transport closing under the handler   5.03
handler runs past ``handler_timeout``   5.03, handler cancelled
``max_in_flight`` handlers already run  5.03 at once, handler not called
====================================  =====================================

Error responses carry a diagnostic payload (RFC 7252 section 5.5.2): UTF-8 text
meant for logs, never parsed. On the requesting side any non-2.xx answer raises
:class:`RemoteRefused` with that code and text.

Errors are split by whose fault they are (see docs/transport.md):
:class:`RequestTimeout` (no answer: loss, partition, dead or slow peer),
:class:`PeerUnreachable` (the network said so, e.g. ICMP port unreachable),
:class:`RemoteRefused` (the peer answered no), :class:`TransportClosed` (we
closed our own transport). A malformed peer address raises
:class:`BadAddress`, both a TransportError (addresses come from the network, so
callers handle it like any failed exchange and keep running) and a ValueError.
Other local misuse (a malformed path, an unsupported method) raises
:class:`ValueError` before anything is sent.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import ClassVar, Protocol

import trio

__all__ = [
    "DEFAULT_HANDLER_TIMEOUT",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_TIMEOUT",
    "METHODS",
    "BadAddress",
    "BadRequest",
    "Dispatcher",
    "Forbidden",
    "Handler",
    "LogBudget",
    "MemoryNetwork",
    "MemoryTransport",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "PeerUnreachable",
    "RemoteRefused",
    "RequestRefused",
    "RequestTimeout",
    "Response",
    "Router",
    "ScopeSet",
    "Transport",
    "TransportClosed",
    "TransportError",
    "TransportStats",
    "Unauthorized",
    "check_request",
    "format_address",
    "split_address",
    "with_default_port",
]

log = logging.getLogger("meshnode.transport")

DEFAULT_MAX_PAYLOAD = 4 * 1024 * 1024
"""Largest request payload a server accepts (4 MiB). A session document with
its full history stays far below this; the cap bounds what a misbehaving peer
can make us buffer."""

DEFAULT_TIMEOUT = 5.0
"""Default bound on one request, seconds: several gossip rounds (1 s each), and
the span over which the CoAP transport's own retransmissions give up."""

DEFAULT_HANDLER_TIMEOUT = DEFAULT_TIMEOUT
"""Longest a server works on one request, seconds. UDP has no way to tell a
server that the requester gave up, so work is bounded instead: past the
longest time a requester waits (``DEFAULT_TIMEOUT``; the node's own requests
wait 3 s) nobody reads the answer, and a server that kept going would feed its
own overload. The handler is cancelled and the request answered 5.03."""

DEFAULT_MAX_IN_FLIGHT = 64
"""Most requests a server works on at once. One more is answered 5.03 at
once instead of queueing behind the others: under overload a server sheds
work rather than growing a backlog that its requesters have given up on."""

METHODS = frozenset({"GET", "POST"})
"""Methods a route can be registered for. GET reads, POST exchanges (sync)."""

Handler = Callable[[bytes, str], Awaitable[bytes]]
"""``await handler(payload, remote) -> response payload``; ``remote`` is the
requester's "host:port". Raise a :class:`RequestRefused` subclass to refuse."""


# --------------------------------------------------------------------------
# Errors seen by the requester


class TransportError(Exception):
    """Base of every failure :meth:`Transport.request` reports."""


class RequestTimeout(TransportError):
    """No answer within the timeout: loss, a partition, a dead or slow peer.
    UDP cannot tell these apart, so neither does the fake."""


class PeerUnreachable(TransportError):
    """The network reported that the peer cannot be reached (ICMP port or host
    unreachable, connection refused). Faster and surer than a timeout, but only
    ever a hint: a firewall drops instead of refusing."""


class BadAddress(TransportError, ValueError):
    """A peer address that is not "host:port" (or "[v6]:port").

    Addresses reach a node from the network (a requester's address, a peer
    list in gossip), so a bad one is a TransportError that callers already
    handle like an unreachable peer; it is also a ValueError, as a local
    mistake with an address always was."""


class TransportClosed(TransportError):
    """Our own transport was closed before or while the request ran: we closed
    it, the network did not break it."""


class RemoteRefused(TransportError):
    """The peer answered with an error code (4.xx or 5.xx).

    Attributes:
        code: the CoAP response code in "c.dd" form, e.g. "4.04".
        message: the diagnostic payload the peer sent, decoded as UTF-8.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code} {self.message}" if self.message else self.code


# --------------------------------------------------------------------------
# Errors a handler raises to refuse a request


class RequestRefused(Exception):
    """Raised by a handler to answer with an error code instead of a payload.

    The peer sent something we will not act on; this is the peer's fault, so
    the server logs it at WARNING and keeps serving. Subclasses fix the code;
    the message becomes the diagnostic payload and should say what was wrong
    without leaking internals.
    """

    code: ClassVar[str] = "4.00"
    message: str = "request refused"

    def __init__(self, message: str | None = None) -> None:
        if message is not None:
            self.message = message
        super().__init__(self.message)


class BadRequest(RequestRefused):
    """4.00: the payload is malformed (bad CBOR, invalid sync message)."""

    code = "4.00"
    message = "bad request"


class Unauthorized(RequestRefused):
    """4.01: the sender is not enrolled or its signature does not verify."""

    code = "4.01"
    message = "unauthorized"


class Forbidden(RequestRefused):
    """4.03: the sender is known but may not do this."""

    code = "4.03"
    message = "forbidden"


class NotFound(RequestRefused):
    """4.04: no such resource (or document)."""

    code = "4.04"
    message = "not found"


class MethodNotAllowed(RequestRefused):
    """4.05: the resource exists but not for this method."""

    code = "4.05"
    message = "method not allowed"


class PayloadTooLarge(RequestRefused):
    """4.13: the request payload exceeds what the server accepts."""

    code = "4.13"
    message = "payload too large"


# --------------------------------------------------------------------------
# Addresses and resources


def split_address(address: str) -> tuple[str, int]:
    """Parse "host:port" or "[v6]:port" into ``(host, port)``.

    Raises:
        BadAddress: if the string is not of that form (a ValueError too).
    """
    if not isinstance(address, str):
        raise BadAddress(f"bad address {address!r}: expected a host:port string")
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise BadAddress(f"bad address {address!r}: expected [v6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or ":" in host:
            raise BadAddress(f"bad address {address!r}: expected host:port")
    if not host or not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadAddress(f"bad address {address!r}: expected host:port")
    return host, int(port_text)


def with_default_port(hostinfo: str, default_port: int) -> str:
    """Complete an address that may leave out the port, as CoAP URIs do for
    the scheme's default port (RFC 7252 s6.1; aiocoap's ``hostinfo`` writes
    "10.78.0.4" for 10.78.0.4:5683 and "[fe80::1%eth0]" for IPv6).

    Returns "host:port" or "[v6]:port", the form every address in the node
    takes, so that a peer is recorded under one address whatever port it uses.

    Raises:
        BadAddress: not "host", "host:port", "[v6]" or "[v6]:port".
    """
    if hostinfo.startswith("["):
        if hostinfo.endswith("]"):
            hostinfo = f"{hostinfo}:{default_port}"
    elif hostinfo.count(":") == 0:
        hostinfo = f"{hostinfo}:{default_port}"
    elif hostinfo.count(":") > 1:  # a bare IPv6 literal
        hostinfo = format_address(hostinfo, default_port)
    split_address(hostinfo)
    return hostinfo


def format_address(host: str, port: int) -> str:
    """Inverse of :func:`split_address`: brackets IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_resource(resource: str) -> tuple[str, ...]:
    """Validate a resource path like "/m/sync" and return its segments.

    Paths are absolute, without query or fragment, without empty segments, so
    that they map one-to-one onto CoAP Uri-Path options (RFC 7252 s6.4).
    """
    if not resource.startswith("/") or any(c in resource for c in "?#"):
        raise ValueError(f"bad resource {resource!r}: expected an absolute path like /m/sync")
    segments = tuple(resource[1:].split("/"))
    if any(not s or s in (".", "..") for s in segments):
        raise ValueError(f"bad resource {resource!r}: empty or dot segment")
    return segments


def check_method(method: str) -> str:
    """Validate a method name for a request or route."""
    if method not in METHODS:
        raise ValueError(f"unsupported method {method!r}: expected one of {sorted(METHODS)}")
    return method


def check_request(peer: str, resource: str, method: str) -> None:
    """The local-misuse checks every `Transport.request` makes before sending."""
    split_address(peer)
    check_resource(resource)
    check_method(method)


# --------------------------------------------------------------------------
# Counters


@dataclasses.dataclass
class TransportStats:
    """Counters for benchmarks and the status page.

    Application level: one request is one request however many CoAP blocks it
    took, and bytes are payload bytes (headers and block overhead excluded), so
    that the fake and CoAP count the same things.

    Attributes:
        requests_sent: requests this transport issued.
        requests_received: requests that reached the dispatcher (including
            refused ones).
        bytes_sent: request payloads sent plus response payloads answered.
        bytes_received: response payloads received plus request payloads
            accepted.
        errors: own requests that raised a TransportError plus incoming
            requests answered with an error code.
    """

    requests_sent: int = 0
    requests_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    errors: int = 0


# --------------------------------------------------------------------------
# The interface


class Transport(Protocol):
    """What the node needs from a network: request/response of bytes.

    Implementations: ``meshnode._coap.CoapTransport`` (opened with
    ``open_coap_transport``) and :class:`MemoryTransport` (opened with
    :meth:`MemoryNetwork.transport`). Both are async context managers at the
    point of creation; closing one cancels its in-flight handlers and requests.
    """

    address: str
    """This node's "host:port" as peers should reach it."""

    stats: TransportStats
    max_payload: int

    def route(self, resource: str, handler: Handler, *, method: str = "POST") -> None:
        """Register ``handler`` for ``method`` requests to ``resource``.

        May be called before or after requests start arriving.

        Raises:
            ValueError: bad path or method, or the pair is already routed.
        """
        ...

    async def request(
        self,
        peer: str,
        resource: str,
        payload: bytes = b"",
        *,
        method: str = "POST",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> bytes:
        """Send a request to ``peer`` ("host:port") and return the response payload.

        Safe to call concurrently from many tasks. ``timeout`` bounds the whole
        exchange including block-wise transfer and retransmissions.

        Raises:
            RequestTimeout: no complete answer within ``timeout`` seconds.
            PeerUnreachable: the network reported the peer unreachable.
            RemoteRefused: the peer answered with an error code.
            TransportClosed: this transport is closed.
            BadAddress: ``peer`` is not "host:port" (a ValueError too).
            TransportError: any other failure of the exchange.
            ValueError: malformed resource or method.
        """
        ...

    async def send(self, peer: str, resource: str, payload: bytes = b"") -> None:
        """Send a one-way POST to ``peer``: no response, no retransmission.

        Returns once the message is handed to the network, not when it arrives;
        it may be lost like any datagram (CoAP: a NON request with No-Response,
        RFC 7967, so the server answers nothing). The handler runs as for a
        request; what it returns is dropped. For pushes a later exchange can
        repair; never for anything that must arrive.

        Raises:
            TransportClosed: this transport is closed.
            ValueError: malformed peer address or resource.
        """
        ...


# --------------------------------------------------------------------------
# Server side shared by all implementations


class Router:
    """The routing table: (path, method) to handler. No I/O.

    Kept separate from any transport so that the fake and CoAP refuse unknown
    paths (4.04) and unrouted methods (4.05) by the same rule.
    """

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}

    def add(self, resource: str, handler: Handler, method: str) -> bool:
        """Register a route. Returns True if the path is new (so a transport
        knows to expose it, e.g. add it to its CoAP site).

        Raises:
            ValueError: bad path or method, or (path, method) already routed:
                silently replacing a handler would hide a wiring mistake.
        """
        check_resource(resource)
        check_method(method)
        methods = self._routes.get(resource)
        if methods is not None and method in methods:
            raise ValueError(f"{method} {resource} is already routed")
        self._routes.setdefault(resource, {})[method] = handler
        return methods is None

    def lookup(self, resource: str, method: str) -> Handler:
        """Find the handler for a request.

        Raises:
            NotFound: no route for the path.
            MethodNotAllowed: the path is routed, but not for this method.
        """
        methods = self._routes.get(resource)
        if methods is None:
            raise NotFound(f"no resource {resource}")
        handler = methods.get(method)
        if handler is None:
            raise MethodNotAllowed(f"{method} not allowed on {resource}")
        return handler

    def __contains__(self, resource: object) -> bool:
        return resource in self._routes

    def paths(self) -> list[str]:
        """All routed paths, sorted (for /.well-known/core)."""
        return sorted(self._routes)

    def routes(self) -> list[tuple[str, str]]:
        """Every routed (path, method), sorted: what a fuzzer or a test of
        every resource walks, so that new routes are covered without a list."""
        return sorted((path, method) for path, methods in self._routes.items() for method in methods)


class LogBudget:
    """How often a repeated complaint about peers may be logged: one line per
    key per ``interval`` seconds, saying how many were held back; every
    occurrence is still counted (``counts``). Sans-IO: the caller passes ``now``.

    A stranger can send refusable input as fast as the network carries it;
    a WARNING for each would make the log the first thing to fill up (the
    field saw 21,653 lines for 24,000 fuzzed datagrams). Keys must come from a
    small set (a response code, an exception type, a routed path), never
    from the input itself; at most ``max_keys`` are remembered, the oldest
    forgotten first.
    """

    def __init__(self, interval: float = 10.0, max_keys: int = 256) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self.counts: collections.Counter[object] = collections.Counter()
        self._open_at: collections.OrderedDict[object, float] = collections.OrderedDict()
        self._held: collections.Counter[object] = collections.Counter()

    def allow(self, key: object, now: float) -> int | None:
        """Count one occurrence of ``key``. Returns None to stay silent, or
        the number of occurrences held back since the last line (0 for the
        first) to log one now."""
        self.counts[key] += 1
        if len(self.counts) > self.max_keys:
            del self.counts[next(iter(self.counts))]
        open_at = self._open_at.get(key)
        if open_at is not None and now < open_at:
            self._held[key] += 1
            return None
        self._open_at[key] = now + self.interval
        self._open_at.move_to_end(key)
        if len(self._open_at) > self.max_keys:
            oldest, _ = self._open_at.popitem(last=False)
            self._held.pop(oldest, None)
        return self._held.pop(key, 0)


def held_back(n: int, interval: float) -> str:
    """The suffix of a rate-limited log line."""
    return f" (and {n} more like it in the last {interval:.0f} s)" if n else ""


@dataclasses.dataclass(frozen=True)
class Response:
    """What the server answers: a CoAP-style code ("2.04", "4.00", ...) and a
    payload (CBOR from the handler on success, diagnostic text otherwise)."""

    code: str
    payload: bytes

    @property
    def ok(self) -> bool:
        return self.code.startswith("2.")


def success_code(method: str) -> str:
    """2.05 Content for GET, 2.04 Changed for POST (RFC 7252 s5.8.1, s5.8.2)."""
    return "2.05" if method == "GET" else "2.04"


def refusal(exc: RequestRefused) -> Response:
    """The response for a handler's refusal: its code, its message as text."""
    return Response(exc.code, exc.message.encode("utf-8", "replace"))


def refusal_in(exc: BaseException) -> RequestRefused | None:
    """The refusal a handler raised, also when its own nursery wrapped it in
    an exception group (trio's strict groups): handler authors should not get
    5.00 for a 4.00 raised in a child task. All leaves must be refusals; the
    first one answers."""
    if isinstance(exc, RequestRefused):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        refusals, rest = exc.split(RequestRefused)
        if refusals is not None and rest is None:
            leaf: BaseException = refusals
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            assert isinstance(leaf, RequestRefused)
            return leaf
    return None


INTERNAL_ERROR = Response("5.00", b"internal server error")
SHUTTING_DOWN = Response("5.03", b"shutting down")
TOO_SLOW = Response("5.03", b"request took too long to serve")
BUSY = Response("5.03", b"busy: too many requests in progress")


def response_error(response: Response) -> RemoteRefused:
    """The requester-side exception for a non-2.xx response."""
    return RemoteRefused(response.code, response.payload.decode("utf-8", "replace"))


class Dispatcher:
    """Runs one incoming request through routing, size limit and handler, and
    maps the outcome to a :class:`Response`; counts and logs it.

    Shared by every transport so that error mapping, logging levels and
    counters are identical on the wire and in the fake. The handler is the only
    thing awaited here.
    """

    def __init__(
        self,
        router: Router,
        stats: TransportStats,
        max_payload: int,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
        handler_timeout: float = DEFAULT_HANDLER_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.router = router
        self.stats = stats
        self.max_payload = max_payload
        self.handler_timeout = handler_timeout
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.abandoned = 0
        """Handlers cancelled at ``handler_timeout``."""
        self.shed = 0
        """Requests answered 5.03 because ``max_in_flight`` handlers ran."""
        self.log = logger
        self.clock = clock
        self.refusals = LogBudget()
        """Refusals counted by (code, routed path or "other"), and the budget
        of WARNING lines about them."""

    def check(self, resource: str, method: str, size: int) -> RequestRefused | None:
        """Decide, without side effects, whether a request must be refused
        before it reaches a handler: too large (4.13), no such path (4.04),
        method not routed (4.05). ``size`` is the payload size, or a lower
        bound on it for a request still arriving in blocks."""
        if size > self.max_payload:
            return PayloadTooLarge(f"payload of {size} bytes exceeds the limit of {self.max_payload} bytes")
        try:
            self.router.lookup(resource, method)
        except RequestRefused as exc:
            return exc
        return None

    def refuse(self, resource: str, remote: str, exc: RequestRefused) -> Response:
        """Count, log and answer a request refused by :meth:`check`."""
        self.stats.requests_received += 1
        return self._refused(resource, remote, exc)

    async def dispatch(self, resource: str, method: str, payload: bytes, remote: str) -> Response:
        """Answer one request. Never raises except for trio cancellation."""
        with trio.move_on_after(self.handler_timeout):
            return await self.dispatch_unbounded(resource, method, payload, remote)
        return self.abandon(resource, method, remote)

    async def dispatch_unbounded(self, resource: str, method: str, payload: bytes, remote: str) -> Response:
        """`dispatch` without its ``handler_timeout``: for a caller that bounds the
        handler in a cancel scope of its own, and calls `abandon` when that scope's
        deadline cancelled it."""
        refused = self.check(resource, method, len(payload))
        if refused is not None:
            return self.refuse(resource, remote, refused)
        self.stats.requests_received += 1
        self.stats.bytes_received += len(payload)
        handler = self.router.lookup(resource, method)
        if self.in_flight >= self.max_in_flight:
            self.shed += 1
            held = self.refusals.allow(("5.03", "busy"), self.clock())
            if held is not None:
                self.log.warning(
                    "shed %s %s from %s: %d requests in progress%s",
                    method,
                    resource,
                    remote,
                    self.in_flight,
                    held_back(held, self.refusals.interval),
                )
            return self._failed(BUSY)
        self.in_flight += 1
        try:
            result = await handler(payload, remote)
            return self._answer(method, resource, remote, payload, result)
        except Exception as exc:
            refused = refusal_in(exc)
            if refused is not None:
                return self._refused(resource, remote, refused)
            self.log.exception("handler for %s %s from %s crashed", method, resource, remote)
            return self._failed(INTERNAL_ERROR)
        finally:
            self.in_flight -= 1

    def abandon(self, resource: str, method: str, remote: str) -> Response:
        """Count, log and answer (5.03) a handler cancelled at ``handler_timeout``."""
        self.abandoned += 1
        held = self.refusals.allow(("5.03", resource), self.clock())
        if held is not None:
            self.log.warning(
                "abandoned %s %s from %s after %.1f s: its requester has given up%s",
                method,
                resource,
                remote,
                self.handler_timeout,
                held_back(held, self.refusals.interval),
            )
        return self._failed(TOO_SLOW)

    def _answer(self, method: str, resource: str, remote: str, payload: bytes, result: object) -> Response:
        if not isinstance(result, (bytes, bytearray, memoryview)):
            self.log.error("handler for %s %s returned %s, not bytes", method, resource, type(result).__name__)
            return self._failed(INTERNAL_ERROR)
        body = bytes(result)
        self.stats.bytes_sent += len(body)
        self.log.debug("%s %s from %s: %d bytes in, %d out", method, resource, remote, len(payload), len(body))
        return Response(success_code(method), body)

    def _refused(self, resource: str, remote: str, exc: RequestRefused) -> Response:
        path = resource if resource in self.router else "other"
        held = self.refusals.allow((exc.code, path), self.clock())
        if held is not None:
            self.log.warning(
                "refused request for %s from %s: %s %s%s",
                resource[:80],
                remote,
                exc.code,
                exc.message[:200],
                held_back(held, self.refusals.interval),
            )
        return self._failed(refusal(exc))

    def _failed(self, response: Response) -> Response:
        self.stats.errors += 1
        self.stats.bytes_sent += len(response.payload)
        return response


class ScopeSet:
    """Cancel scopes of in-flight work that a transport must end on close.

    Handlers of the CoAP transport run in tasks owned by the trio-asyncio loop,
    not in a nursery of ours; tracking their scopes lets ``close`` cancel them
    and wait until they have finished, so no task outlives the transport.
    """

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self._lot = trio.lowlevel.ParkingLot()

    @contextmanager
    def track(self) -> Iterator[trio.CancelScope]:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self.discard(scope)

    def add(self, scope: trio.CancelScope) -> None:
        """Track a scope the caller enters itself (`track` without a generator and
        a scope of its own: the in-memory transport's hot path); `discard` it after."""
        self._scopes.add(scope)

    def discard(self, scope: trio.CancelScope) -> None:
        self._scopes.discard(scope)
        if not self._scopes and self._lot:
            self._lot.unpark_all()

    def cancel_all(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()

    async def wait_idle(self) -> None:
        while self._scopes:
            await self._lot.park()

    def __len__(self) -> int:
        return len(self._scopes)


# --------------------------------------------------------------------------
# In-memory fake


class MemoryNetwork:
    """A switch for :class:`MemoryTransport` instances, with cuttable links.

    Delivery is instant and lossless unless the destination is absent or
    closed or the link is down; then the request is silently dropped and the
    requester times out, as over UDP. The routing decision lives in one hook,
    :meth:`deliverable`, which a richer simulated network may override (drop,
    delay, duplicate with its own seeded random). Time on the wire lives in a
    second one, :meth:`carry` (latency, bandwidth, loss in flight), which the
    simulator's ``sim.SimNetwork`` overrides; here it costs nothing.
    """

    def __init__(self) -> None:
        self._transports: dict[str, MemoryTransport] = {}
        self._down: set[frozenset[str]] = set()

    def set_link(self, a: str, b: str, up: bool) -> None:
        """Cut (``up=False``) or restore the link between two addresses, both
        directions. Requests already in flight lose their response if the link
        is down when it would be delivered."""
        key = frozenset((a, b))
        if up:
            self._down.discard(key)
        else:
            self._down.add(key)

    def link_up(self, a: str, b: str) -> bool:
        return frozenset((a, b)) not in self._down

    def deliverable(self, src: str, dst: str) -> MemoryTransport | None:
        """The transport at ``dst`` if a message from ``src`` reaches it now."""
        target = self._transports.get(dst)
        if target is None or target.closed or not self.link_up(src, dst):
            return None
        return target

    @asynccontextmanager
    async def transport(
        self,
        address: str,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        handler_timeout: float = DEFAULT_HANDLER_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> AsyncIterator[MemoryTransport]:
        """Open a transport at ``address`` ("host:port"); closed on exit.

        Like ``open_coap_transport``, an async context manager: leaving the
        block cancels the transport's handlers and its requests still in
        flight, waits for them, and frees the address. Exceptions from the
        block pass through unwrapped (no nursery, so no ExceptionGroup).

        Raises:
            ValueError: malformed address.
            TransportError: the address is already in use (as the CoAP
                transport reports a port that cannot be bound).
        """
        split_address(address)
        if address in self._transports:
            raise TransportError(f"address {address} is already in use")
        transport = MemoryTransport(
            self, address, max_payload=max_payload, handler_timeout=handler_timeout, max_in_flight=max_in_flight
        )
        self._transports[address] = transport
        try:
            yield transport
        finally:
            del self._transports[address]
            with trio.CancelScope(shield=True):
                await transport._close()

    async def carry(self, src: str, dst: str, resource: str, payload: bytes, *, response: bool) -> bool:
        """Extension point for simulated networks: move one message across the wire.

        Called once for every request (``response=False``, from ``src`` to
        ``dst``) before :meth:`deliverable` decides where it lands, and once
        for every response (``response=True``, from the server ``src`` back to
        the requester ``dst``) before :meth:`link_up` is checked for it. An
        override sleeps for as long as the message takes to cross (latency,
        size over bandwidth) and returns False to lose it in flight; it sees
        the payload's bytes, never the objects behind them. A lost message
        behaves as a lost datagram: the requester waits until its timeout.

        The base network is instant and lossless: it returns True at once,
        without a checkpoint.
        """
        return True

    async def _one_way(self, src: str, dst: str, resource: str, payload: bytes) -> MemoryTransport | None:
        """Carry one one-way message; the transport it reached (whose handler runs it,
        its answer going nowhere), or None."""
        if not await self.carry(src, dst, resource, payload, response=False):
            log.debug("message %s %s -> %s lost in flight", resource, src, dst)
            return None
        target = self.deliverable(src, dst)
        if target is None:
            log.debug("message %s %s -> %s dropped", resource, src, dst)
        return target

    async def _exchange(self, src: str, dst: str, resource: str, method: str, payload: bytes) -> Response:
        """Carry one request and its response; waits forever where UDP would
        lose a datagram (the requester's timeout ends the wait)."""
        if not await self.carry(src, dst, resource, payload, response=False):
            log.debug("request %s %s -> %s lost in flight", resource, src, dst)
            await trio.sleep_forever()
        target = self.deliverable(src, dst)
        if target is None:
            log.debug("request %s %s -> %s dropped", resource, src, dst)
            await trio.sleep_forever()
        assert target is not None
        response = await target._serve(src, resource, method, payload)
        if not await self.carry(dst, src, resource, response.payload, response=True):
            log.debug("response %s %s -> %s lost in flight", resource, dst, src)
            await trio.sleep_forever()
        if not self.link_up(dst, src):
            log.debug("response %s %s -> %s dropped", resource, dst, src)
            await trio.sleep_forever()
        return response


class _Answer:
    """A one-slot rendezvous: the handler task delivers one response, the requester
    waits for it (a memory channel's work, without its objects, per request)."""

    __slots__ = ("response", "waiter", "gone")

    def __init__(self) -> None:
        self.response: Response | None = None
        self.waiter: trio.lowlevel.Task | None = None
        self.gone = False

    def deliver(self, response: Response, src: str, resource: str) -> None:
        if self.gone:
            log.debug("response to %s for %s dropped: requester gone", src, resource)
            return
        self.response = response
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            trio.lowlevel.reschedule(waiter)

    async def wait(self) -> Response:
        if self.response is None:
            self.waiter = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self.waiter = None
                self.gone = True
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        else:
            await trio.lowlevel.checkpoint()
        assert self.response is not None
        return self.response


class MemoryTransport:
    """In-memory :class:`Transport`; create with :meth:`MemoryNetwork.transport`.

    Handlers run in tasks of their own, not in the requester's task, so a
    requester that times out does not cancel the handler, as on a real
    network. Like the CoAP transport's handlers (which run in tasks of the
    trio-asyncio loop), they are tracked and cancelled and awaited on close;
    they are trio system tasks carrying the contextvars of whoever opened the
    transport, which keeps exceptions from the ``async with`` body unwrapped.
    """

    def __init__(
        self,
        network: MemoryNetwork,
        address: str,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        handler_timeout: float = DEFAULT_HANDLER_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.address = address
        self.max_payload = max_payload
        self.stats = TransportStats()
        self._network = network
        self._context = contextvars.copy_context()
        self._router = Router()
        self._dispatcher = Dispatcher(
            self._router, self.stats, max_payload, handler_timeout=handler_timeout, max_in_flight=max_in_flight
        )
        self._handlers = ScopeSet()
        self._requests = ScopeSet()
        self._checked: set[tuple[str, str, str]] = set()
        self.closed = False

    def route(self, resource: str, handler: Handler, *, method: str = "POST") -> None:
        self._router.add(resource, handler, method)

    def routes(self) -> list[tuple[str, str]]:
        """Every routed (path, method); see :meth:`Router.routes`."""
        return self._router.routes()

    async def request(
        self,
        peer: str,
        resource: str,
        payload: bytes = b"",
        *,
        method: str = "POST",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> bytes:
        self._check(peer, resource, method)
        if self.closed:
            raise TransportClosed(f"transport {self.address} is closed")
        body = bytes(payload)
        self.stats.requests_sent += 1
        self.stats.bytes_sent += len(body)
        response: Response | None = None
        # One scope is both the timeout and what `_close` cancels (tracked).
        scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        requests = self._requests
        requests.add(scope)
        try:
            with scope:
                response = await self._network._exchange(self.address, peer, resource, method, body)
        finally:
            requests.discard(scope)
        if response is None:
            self.stats.errors += 1
            if self.closed:
                raise TransportClosed(f"transport {self.address} closed during {method} {peer}{resource}")
            raise RequestTimeout(f"{method} {peer}{resource}: no answer within {timeout} s")
        self.stats.bytes_received += len(response.payload)
        if not response.ok:
            self.stats.errors += 1
            raise response_error(response)
        return response.payload

    async def send(self, peer: str, resource: str, payload: bytes = b"") -> None:
        self._check(peer, resource, "POST")
        if self.closed:
            raise TransportClosed(f"transport {self.address} is closed")
        body = bytes(payload)
        self.stats.requests_sent += 1
        self.stats.bytes_sent += len(body)
        trio.lowlevel.spawn_system_task(self._send_task, peer, resource, body, context=self._context)

    def _check(self, peer: str, resource: str, method: str) -> None:
        """`check_request`, remembered for the (peer, resource, method) it passed."""
        key = (peer, resource, method)
        if key not in self._checked:
            check_request(peer, resource, method)
            if len(self._checked) >= 4096:
                self._checked.clear()
            self._checked.add(key)

    async def _send_task(self, peer: str, resource: str, body: bytes) -> None:
        """Carries one one-way message (a system task: must not raise)."""
        if self.closed:
            return
        scope = trio.CancelScope()
        self._requests.add(scope)
        target = None
        try:
            with scope:
                target = await self._network._one_way(self.address, peer, resource, body)
        finally:
            self._requests.discard(scope)
        if target is not None:
            # Delivered: the message is the receiver's now (our close no longer cancels it).
            # Its handler runs here, in this task, tracked by the receiver: nobody waits for
            # its answer, so it needs no task of its own (and no rendezvous).
            await target._handle(None, self.address, resource, "POST", body)

    async def _serve(self, src: str, resource: str, method: str, payload: bytes) -> Response:
        """Run the request in a task of its own and wait for its response."""
        answer = _Answer()
        trio.lowlevel.spawn_system_task(self._handle, answer, src, resource, method, payload, context=self._context)
        # If the handler ends without an answer (the run is ending under it), this waits
        # until the requester's own timeout or cancellation, as for a lost datagram.
        return await answer.wait()

    async def _handle(self, answer: _Answer | None, src: str, resource: str, method: str, payload: bytes) -> None:
        """A handler task (or a one-way message's, ``answer`` None). Must not raise: it
        runs in a system task."""
        response = SHUTTING_DOWN  # closing under a handler answers 5.03, as the CoAP transport does
        if not self.closed:
            # One scope is both the handler's deadline and what `_close` cancels (tracked).
            dispatcher = self._dispatcher
            scope = trio.CancelScope(deadline=trio.current_time() + dispatcher.handler_timeout)
            handlers = self._handlers
            handlers.add(scope)
            try:
                with scope:
                    response = await dispatcher.dispatch_unbounded(resource, method, payload, src)
            finally:
                handlers.discard(scope)
            if scope.cancelled_caught and not self.closed:
                response = dispatcher.abandon(resource, method, src)
        if answer is not None:
            answer.deliver(response, src, resource)

    async def _close(self) -> None:
        self.closed = True
        self._handlers.cancel_all()
        self._requests.cancel_all()
        await self._handlers.wait_idle()
        await self._requests.wait_idle()
