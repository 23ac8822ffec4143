"""CoAP transport: the :class:`~meshnode._transport.Transport` seam over UDP.

Built on aiocoap, an asyncio library, hosted inside the node's trio run by
trio-asyncio. The caller opens the asyncio loop once (``async with
trio_asyncio.open_loop():``, shared with python-zeroconf) and opens the
transport inside it with :func:`open_coap_transport`. trio calls into aiocoap
through ``trio_asyncio.aio_as_trio``; aiocoap's resource ``render`` coroutines
(asyncio) call the trio handlers through ``trio_asyncio.trio_as_aio``.

What it implements, and choices made:

- One UDP socket per node (RFC 7252 s4, aiocoap's ``udp6`` transport): the
  server context also sends our requests, so peers see requests coming from the
  address they would reach us at.
- Confirmable requests with retransmission tuned for a local mesh
  (:class:`MeshTuning`, RFC 7252 s4.2 and s4.8): ACK_TIMEOUT 0.5 s and
  MAX_RETRANSMIT 3 instead of 2 s and 4, so the exchange gives up after
  MAX_TRANSMIT_SPAN = 0.5 * (2**3 - 1) * 1.5 = 5.25 s, next to the 5 s default
  request timeout, instead of 45 s. CON (not NON) because block-wise transfers
  are lock-step: with NON one lost datagram loses a whole 300-block transfer,
  with CON only a 0.5 s retransmission. The caller's ``timeout`` bounds the
  whole exchange regardless (``trio.fail_after`` around the awaited response;
  cancelling it cancels the aiocoap request).
- Block-wise transfer (RFC 7959) both ways: aiocoap splits and reassembles
  (Block1 for requests, Block2 for responses, 1024-byte blocks). Every request
  carries a fresh Request-Tag (RFC 9175 s3): aiocoap keys its server-side
  reassembly by (client, method, options), so without it two concurrent
  block-wise requests from one peer to the same path are spliced into each
  other.
- Size limit: a request whose Size1 (RFC 7959 s4) or block offset shows it will
  exceed ``max_payload`` is answered 4.13 with Size1 = the limit (RFC 7959
  s2.9.3) on its first offending block, before it is buffered or reaches the
  handler.
- Payloads are CBOR: 2.xx responses carry Content-Format 60
  (application/cbor, RFC 8949 s9.5); error responses carry a diagnostic
  payload (RFC 7252 s5.5.2). ``/.well-known/core`` lists the routes in link
  format (RFC 6690, RFC 7252 s7.2).

Response codes and errors are shared with the in-memory fake through
:class:`~meshnode._transport.Dispatcher`; see that module and
docs/transport.md.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiocoap
import aiocoap.error
import aiocoap.pipe
import aiocoap.resource
import trio
import trio_asyncio
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning

from ._transport import (
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_TIMEOUT,
    SHUTTING_DOWN,
    Dispatcher,
    Handler,
    PeerUnreachable,
    RequestRefused,
    RequestTimeout,
    Response,
    Router,
    ScopeSet,
    TransportClosed,
    TransportError,
    TransportStats,
    check_request,
    check_resource,
    format_address,
    response_error,
)

__all__ = [
    "CBOR_CONTENT_FORMAT",
    "CoapTransport",
    "MeshTuning",
    "block1_extent",
    "open_coap_transport",
    "translate_error",
]

log = logging.getLogger("meshnode.coap")

AIOCOAP_LOGGER = "meshnode.coap.aiocoap"
"""Logger name handed to aiocoap's context, so its messages sit under ours."""

CBOR_CONTENT_FORMAT = 60
NO_RESPONSE_ALL = 26
"""RFC 7967 No-Response value: suppress 2.xx, 4.xx and 5.xx answers."""
NON_MAX_PAYLOAD = 1024
"""Largest one-way payload sent as a single NON datagram (one block)."""
"""application/cbor (RFC 8949 s9.5, CoAP Content-Formats registry)."""

UNREACHABLE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
)
"""OSErrors (mostly ICMP errors read from the socket's error queue) that mean
the peer cannot be reached, as opposed to a local failure."""


class MeshTuning(TransportTuning):
    """Retransmission parameters for a local mesh (RFC 7252 s4.8).

    Round trips on a charger LAN or Wi-Fi are milliseconds, so 0.5 s is still
    a generous ACK_TIMEOUT. Three retransmissions survive short bursts of loss,
    and the exchange ends after about 5 s (MAX_TRANSMIT_SPAN 5.25 s), which
    also bounds how long an unanswered exchange holds aiocoap's NSTART=1 slot
    to that peer. ``reliability = True`` asks for CON messages.
    """

    ACK_TIMEOUT = 0.5
    MAX_RETRANSMIT = 3
    reliability = True


def block1_extent(block_number: int, block_size: int, payload_len: int, size1: int | None) -> int:
    """Lower bound on a block-wise request's total size, from one block.

    It is at least the end of this block and at least what the client
    announced in Size1 (RFC 7959 s4). A client that lies low in Size1 is still
    caught by its block offsets, one block late.
    """
    return max(block_number * block_size + payload_len, size1 or 0)


def translate_error(exc: Exception, what: str) -> TransportError:
    """Map an aiocoap or socket error from a request to our error classes.

    Returns the exception to raise (the caller chains it ``from exc``).
    """
    if isinstance(exc, aiocoap.error.TimeoutError):
        return RequestTimeout(f"{what}: retransmissions exhausted")
    if isinstance(exc, aiocoap.error.LibraryShutdown):
        return TransportClosed(f"{what}: transport shut down")
    if isinstance(exc, aiocoap.error.ResolutionError):
        return PeerUnreachable(f"{what}: cannot resolve peer address")
    cause = exc.__cause__ if isinstance(exc, aiocoap.error.NetworkError) else exc
    if isinstance(cause, OSError) and cause.errno in UNREACHABLE_ERRNOS:
        return PeerUnreachable(f"{what}: {cause.strerror or cause}")
    return TransportError(f"{what}: {exc!r}")


def _code_from_dotted(dotted: str) -> Code:
    klass, _, detail = dotted.partition(".")
    return Code((int(klass) << 5) | int(detail))


class _QuietContinue(logging.Filter):
    """aiocoap logs every intermediate 2.31 Continue of a block-wise upload at
    INFO (300 lines for a 300 KB request). Those are normal operation, DEBUG
    in our scheme; other records pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno == logging.INFO
            and str(record.msg).startswith("Render request raised a renderable error")
            and "ContinueException" in str(record.args)
        ):
            record.levelno = logging.DEBUG
            record.levelname = "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger(AIOCOAP_LOGGER).addFilter(_QuietContinue())


class _RouteResource(aiocoap.resource.Resource):
    """One routed path. aiocoap reassembles Block1 and slices Block2 around
    :meth:`render`; render hands the whole payload to the trio side."""

    ct = CBOR_CONTENT_FORMAT  # advertised in /.well-known/core

    def __init__(self, transport: CoapTransport, resource: str) -> None:
        super().__init__()
        self._transport = transport
        self._resource = resource

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._transport._render(self._resource, request)


class _MeshSite(aiocoap.resource.Site):
    """The site: refuses, before any reassembly, what must not reach a handler.

    Unknown paths (4.04), unrouted methods (4.05) and oversized uploads (4.13)
    are decided by the shared Dispatcher, so they are counted and logged like
    in the fake; everything else goes through aiocoap's Site dispatch.
    """

    def __init__(self, transport: CoapTransport) -> None:
        super().__init__()
        self._transport = transport

    async def render_to_pipe(self, pipe: aiocoap.pipe.Pipe) -> None:
        request = pipe.request
        if request.opt.uri_path_abbrev is None and request.opt.uri_path != (".well-known", "core"):
            refusal = self._transport._precheck(request)
            if refusal is not None:
                pipe.add_response(refusal, is_last=True)
                return
        await super().render_to_pipe(pipe)


class CoapTransport:
    """CoAP implementation of :class:`~meshnode._transport.Transport`.

    Create with :func:`open_coap_transport`; see the module docstring.
    """

    def __init__(
        self,
        loop: trio_asyncio.TrioEventLoop,
        bind: str,
        port: int,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        tuning: TransportTuning | None = None,
    ) -> None:
        self.address = format_address(bind, port)
        self.max_payload = max_payload
        self.stats = TransportStats()
        self._bind = (bind, port)
        self._loop = loop
        self._tuning = tuning if tuning is not None else MeshTuning()
        self._router = Router()
        self._dispatcher = Dispatcher(self._router, self.stats, max_payload)
        self._site = _MeshSite(self)
        self._site.add_resource(
            (".well-known", "core"),
            aiocoap.resource.WKCResource(self._site.get_resources_as_linkheader, impl_info=None),
        )
        self._context: aiocoap.Context | None = None
        self._handlers = ScopeSet()
        self._requests = ScopeSet()
        self._request_tags = itertools.count(1)
        self._closed = False
        self._renders = 0
        self._renders_idle: asyncio.Event | None = None

    # -- Transport interface ----------------------------------------------

    def route(self, resource: str, handler: Handler, *, method: str = "POST") -> None:
        if self._router.add(resource, handler, method):
            self._site.add_resource(check_resource(resource), _RouteResource(self, resource))

    async def request(
        self,
        peer: str,
        resource: str,
        payload: bytes = b"",
        *,
        method: str = "POST",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> bytes:
        check_request(peer, resource, method)
        if self._closed or self._context is None:
            raise TransportClosed(f"transport {self.address} is closed")
        what = f"{method} coap://{peer}{resource}"
        body = bytes(payload)
        message = aiocoap.Message(
            code=Code.GET if method == "GET" else Code.POST,
            payload=body,
            uri=f"coap://{peer}{resource}",
            transport_tuning=self._tuning,
        )
        if body:
            message.opt.content_format = CBOR_CONTENT_FORMAT
        message.opt.request_tag = [self._next_request_tag()]
        self.stats.requests_sent += 1
        self.stats.bytes_sent += len(body)
        response: aiocoap.Message | None = None
        try:
            with self._requests.track(), trio.fail_after(timeout):
                response = await trio_asyncio.aio_as_trio(self._aio_request, loop=self._loop)(message)
        except trio.TooSlowError as exc:
            self.stats.errors += 1
            raise RequestTimeout(f"{what}: no answer within {timeout} s") from exc
        except (aiocoap.error.Error, OSError) as exc:
            self.stats.errors += 1
            raise translate_error(exc, what) from exc
        if response is None:
            self.stats.errors += 1
            raise TransportClosed(f"{what}: transport closed during the request")
        self.stats.bytes_received += len(response.payload)
        if not response.code.is_successful():
            self.stats.errors += 1
            raise response_error(Response(response.code.dotted, response.payload))
        log.debug("%s: %s, %d bytes", what, response.code.dotted, len(response.payload))
        return response.payload

    async def send(self, peer: str, resource: str, payload: bytes = b"") -> None:
        """One-way POST: a NON request with No-Response 26 (RFC 7967 s2.1: no
        answer of any class), so neither side keeps state for it. A payload
        larger than one block cannot go as one NON datagram; it goes as a
        confirmable block-wise request in the background whose answer is
        dropped (bounded by the default timeout)."""
        check_request(peer, resource, "POST")
        if self._closed or self._context is None:
            raise TransportClosed(f"transport {self.address} is closed")
        body = bytes(payload)
        self.stats.requests_sent += 1
        self.stats.bytes_sent += len(body)
        big = len(body) > NON_MAX_PAYLOAD
        message = aiocoap.Message(
            mtype=aiocoap.CON if big else aiocoap.NON,
            code=Code.POST,
            payload=body,
            uri=f"coap://{peer}{resource}",
            transport_tuning=self._tuning,
        )
        message.opt.content_format = CBOR_CONTENT_FORMAT
        message.opt.no_response = NO_RESPONSE_ALL
        message.opt.request_tag = [self._next_request_tag()]
        try:
            await trio_asyncio.aio_as_trio(self._aio_send, loop=self._loop)(message, big)
        except (aiocoap.error.Error, OSError) as exc:
            self.stats.errors += 1
            log.debug("one-way POST coap://%s%s failed: %s", peer, resource, exc)

    async def _aio_send(self, message: aiocoap.Message, big: bool) -> None:
        """asyncio side of `send`: hand the datagram to aiocoap, keep no interest in an answer."""
        assert self._context is not None
        request = self._context.request(message, handle_blockwise=big)
        # Let aiocoap's sending task run, then drop the (never coming) response.
        for _ in range(3):
            await asyncio.sleep(0)

        async def linger() -> None:
            try:
                await asyncio.wait_for(request.response, DEFAULT_TIMEOUT)
            except BaseException:  # noqa: BLE001 - nothing waits for this answer
                pass

        asyncio.ensure_future(linger())

    # -- lifecycle ------------------------------------------------------------

    async def _open(self) -> None:
        host, port = self._bind
        await _check_port_free(host, port)
        try:
            self._context = await trio_asyncio.aio_as_trio(
                aiocoap.Context.create_server_context, loop=self._loop
            )(
                self._site,
                bind=(host, port),
                loggername=AIOCOAP_LOGGER,
                transports=["udp6"],
            )
        except (OSError, aiocoap.error.Error) as exc:
            raise TransportError(f"cannot open CoAP transport on {self.address}: {exc}") from exc
        try:
            _guard_datagram_input(self._context)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio_asyncio.aio_as_trio(self._context.shutdown, loop=self._loop)()
            raise
        log.debug("CoAP transport listening on %s", self.address)

    async def _close(self) -> None:
        """Stop: refuse new work, cancel handlers and requests in flight, wait
        for them, then shut the aiocoap context (closing the socket)."""
        self._closed = True
        self._handlers.cancel_all()
        self._requests.cancel_all()
        await self._handlers.wait_idle()
        await self._requests.wait_idle()
        # Let the asyncio side hand the handlers' last answers (5.03) to
        # aiocoap before the context goes, so peers hear them.
        await trio_asyncio.aio_as_trio(self._aio_wait_renders, loop=self._loop)()
        if self._context is not None:
            context, self._context = self._context, None
            await trio_asyncio.aio_as_trio(context.shutdown, loop=self._loop)()
        log.debug("CoAP transport on %s closed", self.address)

    # -- internals ------------------------------------------------------------

    def _next_request_tag(self) -> bytes:
        """Short, unique among our concurrent requests (RFC 9175 s3.3)."""
        n = next(self._request_tags) & 0xFFFFFFFF
        return n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")

    async def _aio_request(self, message: aiocoap.Message) -> aiocoap.Message:
        """asyncio side of a request: runs as an asyncio task, so cancelling it
        from trio cancels aiocoap's response future and with it the
        block-wise runner."""
        assert self._context is not None
        return await self._context.request(message).response

    def _precheck(self, request: aiocoap.Message) -> aiocoap.Message | None:
        """The refusal message for a request that must not reach a handler."""
        resource = "/" + "/".join(request.opt.uri_path)
        block1 = request.opt.block1
        if block1 is None:
            size = len(request.payload)
        else:
            size = block1_extent(block1.block_number, block1.size, len(request.payload), request.opt.size1)
        refused: RequestRefused | None = self._dispatcher.check(resource, request.code.name, size)
        if refused is None:
            return None
        return self._message(self._dispatcher.refuse(resource, request.remote.hostinfo, refused))

    async def _render(self, resource: str, request: aiocoap.Message) -> aiocoap.Message:
        """asyncio side of serving: hand the reassembled request to trio.

        Counted so that closing can wait until every answer has been handed to
        aiocoap: aiocoap sends it synchronously once this returns.
        """
        self._renders += 1
        try:
            response: Response = await trio_asyncio.trio_as_aio(self._serve, loop=self._loop)(
                resource, request.code.name, bytes(request.payload), request.remote.hostinfo
            )
            message = self._message(response)
            # RFC 7967: a one-way request (`send`) asks for no answer; aiocoap drops it.
            message.opt.no_response = request.opt.no_response
            return message
        finally:
            self._renders -= 1
            if self._renders == 0 and self._renders_idle is not None:
                self._renders_idle.set()

    async def _aio_wait_renders(self) -> None:
        while self._renders:
            self._renders_idle = asyncio.Event()
            await self._renders_idle.wait()

    async def _serve(self, resource: str, method: str, payload: bytes, remote: str) -> Response:
        """trio side of serving: one handler call, cancelled if we close."""
        if self._closed:
            return SHUTTING_DOWN
        with self._handlers.track():
            return await self._dispatcher.dispatch(resource, method, payload, remote)
        return SHUTTING_DOWN

    def _message(self, response: Response) -> aiocoap.Message:
        message = aiocoap.Message(
            code=_code_from_dotted(response.code),
            payload=response.payload,
            transport_tuning=self._tuning,
        )
        if response.ok:
            message.opt.content_format = CBOR_CONTENT_FORMAT
        elif response.code == "4.13":
            message.opt.size1 = self.max_payload
        return message


def _guard_datagram_input(context: aiocoap.Context) -> None:
    """Make sure no datagram a peer sends can stop the node.

    aiocoap 0.4.17 decodes each datagram in the socket's read callback and
    catches only ``UnparsableMessage``; a string option holding invalid UTF-8
    raises ``UnicodeDecodeError`` there (about one in six random CoAP-looking
    datagrams). Plain asyncio would log that and go on, but trio-asyncio's
    exception handler re-raises it into the loop's nursery, which ends the
    whole ``open_loop()`` block: one datagram from anyone kills the node.
    So the UDP endpoint's ``datagram_msg_received`` is wrapped to drop, and log
    at WARNING, any datagram whose handling raises.

    This reaches into aiocoap's request-interface chain (context, token
    manager, message manager, UDP endpoint); if that shape changes, opening
    fails loudly here rather than running unguarded.
    """
    endpoints = [
        getattr(getattr(interface, "token_interface", None), "message_interface", None)
        for interface in context.request_interfaces
    ]
    guarded = 0
    for endpoint in endpoints:
        receive = getattr(endpoint, "datagram_msg_received", None)
        if receive is None:
            continue
        endpoint.datagram_msg_received = _drop_on_error(receive)
        guarded += 1
    if guarded != 1:
        raise RuntimeError(
            f"expected one aiocoap UDP endpoint to guard, found {guarded}; aiocoap internals changed"
        )


def _drop_on_error(receive: Callable[[bytes, Any, int, Any], None]) -> Callable[[bytes, Any, int, Any], None]:
    def guarded_receive(data: bytes, ancdata: Any, flags: int, address: Any) -> None:
        try:
            receive(data, ancdata, flags, address)
        except Exception as exc:
            log.warning("dropped a datagram of %d bytes from %s: %r", len(data), address, exc)

    return guarded_receive


async def _check_port_free(host: str, port: int) -> None:
    """Fail if another socket holds (host, port).

    aiocoap sets SO_REUSEPORT on its server socket, so a second node on the
    same address would bind without error and the kernel would split datagrams
    between the two. A probe bind without SO_REUSEPORT fails while any such
    socket exists. (A race with a process binding between the probe and
    aiocoap's bind remains; it needs that process to set SO_REUSEPORT too.)
    """
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise TransportError(f"cannot resolve bind address {host!r}") from exc
    family, type_, proto, _, sockaddr = infos[0]
    probe = socket.socket(family, type_, proto)
    try:
        probe.bind(sockaddr)
    except OSError as exc:
        raise TransportError(f"cannot bind {format_address(host, port)}: {exc.strerror}") from exc
    finally:
        probe.close()


@asynccontextmanager
async def open_coap_transport(
    bind: str = "127.0.0.1",
    port: int = 5683,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    tuning: TransportTuning | None = None,
) -> AsyncIterator[CoapTransport]:
    """Serve and send CoAP on UDP ``bind``:``port`` for the duration of the block.

    Must run inside ``trio_asyncio.open_loop()``; the loop is captured here
    and passed explicitly to every trio-asyncio call, so the transport works
    from any trio task, including ones that did not inherit the loop's
    context variable.

    Args:
        bind: a concrete local IP address; it is also the address peers are
            told (``transport.address``). Several nodes on one host use
            distinct loopback addresses (127.0.0.2, 127.0.0.3, ...).
        port: UDP port, 5683 by default (RFC 7252 s6.1); must be fixed, since
            the address is advertised.
        max_payload: largest request payload accepted; larger ones get 4.13.
        tuning: retransmission parameters, :class:`MeshTuning` by default.

    Raises:
        TransportError: the address cannot be bound (in use, not local).
        RuntimeError: not inside ``trio_asyncio.open_loop()``.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535, got {port}")
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        raise RuntimeError("open_coap_transport must run inside trio_asyncio.open_loop()")
    transport = CoapTransport(loop, bind, port, max_payload=max_payload, tuning=tuning)
    await transport._open()
    try:
        yield transport
    finally:
        with trio.CancelScope(shield=True):
            await transport._close()
