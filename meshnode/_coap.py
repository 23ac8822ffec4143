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
  with CON only a 0.5 s retransmission.
- The caller's ``timeout`` is a deadline on *progress*, not on the whole
  exchange: the request fails when ``timeout`` seconds pass without an answer
  from the peer (an ACK, RST or response datagram: a block of this or another
  of our requests; the peer's own requests do not count) *and* without a
  transmission of this request's current message by aiocoap (its first send
  or a retransmission), and in any case after ``PROGRESS_CAP`` times
  ``timeout`` (cancelling it cancels the aiocoap request). So every try
  aiocoap makes gets ``timeout`` for its answer: with the node's 3 s the
  fourth transmission (at 7 ACK_TIMEOUTs, 3.5-5.25 s) is made and heard,
  where a bound counted from the first lost the request before it; a silent
  peer fails ``timeout`` after the last try (6.5-8.25 s for 3 s), a
  ``timeout`` shorter than one ACK_TIMEOUT as before. A try to the peer
  moves the deadline of every request to it: aiocoap has one confirmable
  exchange per peer at a time (NSTART = 1) and the others wait in its
  backlog, where a quarter of the failed requests of the field runs under
  loss timed out without having been sent. Under 30 % loss per
  hop one try (message and answer) gets through with 0.49; three tries
  leave 13 % of the messages unanswered, four 7 %, five 3.5 %; a request of
  n lock-step blocks needs every one. A block-wise request is one lock-step round trip per 1 KiB block:
  on a loaded host (the field suite saw round trips near 1 s at 0 % loss), a
  fixed 3 s bound made every request of more than a few blocks fail every
  time, the late answers were dropped, and the mesh stopped converging.
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
import collections
import copy
import errno
import inspect
import itertools
import logging
import random
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiocoap
import aiocoap.blockwise
import aiocoap.error
import aiocoap.pipe
import aiocoap.protocol
import aiocoap.resource
import trio
import trio_asyncio
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import COAP_PORT, TransportTuning
from aiocoap.numbers.types import CON, NON
from aiocoap.util.asyncio.timeoutdict import TimeoutDict

from ._transport import (
    DEFAULT_HANDLER_TIMEOUT,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_TIMEOUT,
    SHUTTING_DOWN,
    Dispatcher,
    Handler,
    LogBudget,
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
    held_back,
    response_error,
    split_address,
    with_default_port,
)

__all__ = [
    "CBOR_CONTENT_FORMAT",
    "CoapTransport",
    "MeshTuning",
    "block1_extent",
    "open_coap_transport",
    "remote_address",
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
NON_COPIES = 2
"""Copies of a one-way NON datagram sent after it, the same message (same
message id), after ACK_TIMEOUT and then twice that (each times 1 to
ACK_RANDOM_FACTOR), as a confirmable message would be retransmitted, but
without waiting for an ACK that No-Response suppresses. The receiver drops a
copy whose message id it has seen (RFC 7252 s4.5), before any decoding of the
body; a copy saves a push that a lossy link lost: at 30 % loss one datagram in
0.3 is lost, with two copies one in 0.027 (a receipt pushed to five peers
then reaches them all 87 % of the time, not 17 %; the rest wait for
anti-entropy)."""
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


PROGRESS_CAP = 20.0
"""A request whose peer keeps answering (block by block) may run to this many
times its ``timeout``, no longer: 60 s for the node's 3 s, time for a 256 KiB
sync batch at 0.2 s per block round trip (the field suite under load)."""


DEDUP_LIFETIME = 30.0
"""Seconds a received request's message id is remembered to recognise a
retransmission (RFC 7252 s4.5). aiocoap keeps it for EXCHANGE_LIFETIME, 247 s
from the RFC's MAX_LATENCY of 100 s, with a timer per message: 44,000 fuzzed
datagrams in the field were that many entries, timers and decoded messages.
Our peers retransmit for MAX_TRANSMIT_SPAN = 5.25 s (:class:`MeshTuning`); a
generic client with default tuning for 45 s, after which a late duplicate is
served again (our handlers are idempotent: sync, digest, members, hello)."""

DEDUP_MAX = 4096
"""Most message ids remembered; the oldest go first. A second bound next to
the lifetime, so a flood from strangers costs at most this many entries."""

BLOCKWISE_MAX = 16
"""Most incomplete block-wise uploads one route keeps; the oldest go first.
aiocoap bounds them only by time (93 to 186 s); each may hold up to
``max_payload`` bytes, and anyone can start one."""

BLOCK2_CACHE_MAX = 64
"""Most block-wise responses one route keeps for their requesters to fetch
block by block; the oldest go first. Entries outlive their transfer by up to
two MAX_TRANSMIT_WAIT (22 s), so the bound is larger than for uploads: an
entry evicted mid-transfer fails that request (4.08). What is cached is our
own answers, to requests that passed the handler."""


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
    INFO (300 lines for a 300 KB request), and every duplicate NON it drops
    (the copies of our one-way pushes, `NON_COPIES`). Those are normal
    operation, DEBUG in our scheme; other records pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and (
            (
                str(record.msg).startswith("Render request raised a renderable error")
                and "ContinueException" in str(record.args)
            )
            or str(record.msg).startswith("Duplicate NON")  # the copies of one-way pushes (NON_COPIES)
        ):
            record.levelno = logging.DEBUG
            record.levelname = "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class _RateLimited(logging.Filter):
    """aiocoap logs at WARNING for many things a stranger can cause at will
    ("Ignoring unparsable message", "Received a message with code ... (those
    don't fit)", ...). One line per message template per 10 s, with how many
    were held back; INFO and DEBUG pass unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = LogBudget()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        held = self.budget.allow((record.name, str(record.msg)), time.monotonic())
        if held is None:
            return False
        if held:
            record.msg = record.getMessage() + held_back(held, self.budget.interval)
            record.args = None
        return True


AIOCOAP_LOG_BUDGET = _RateLimited()
_INTERNAL_ERRORS = LogBudget()


def _internal_error_log(text: str) -> None:
    """One ERROR line per 10 s for aiocoap's internal failures, with how many were held back."""
    held = _INTERNAL_ERRORS.allow("aiocoap-internal", time.monotonic())
    if held is not None:
        log.error("%s%s", text, held_back(held, _INTERNAL_ERRORS.interval) if held else "")


for _name in (AIOCOAP_LOGGER, f"{AIOCOAP_LOGGER}.blockwise-requester"):
    logging.getLogger(_name).addFilter(_QuietContinue())
    logging.getLogger(_name).addFilter(AIOCOAP_LOG_BUDGET)


# --------------------------------------------------------------------------
# A requester that gave up: aiocoap's futures must not be set afterwards
#
# Our request() runs aiocoap's request in an asyncio task; when the caller's
# deadline passes, trio-asyncio cancels that task, and the cancellation walks
# down aiocoap's chain one loop pass at a time: the BlockwiseRequest's
# response future is cancelled, its done callback (run later by call_soon)
# cancels the block-wise runner task, whose await cancels the inner
# Request's response future, whose done callback (again later) unhooks that
# Request from its pipe. In 0.4.17 neither Request._run (protocol.py:628/630)
# nor BlockwiseRequest._run (protocol.py:940) checks for a cancelled future
# before setting it, so an event that arrives inside one of those windows
# raises InvalidStateError:
#
# - a response datagram: in MessageInterfaceUDP6.datagram_msg_received, under
#   _guard_datagram_input (the datagram was dropped, and the pipe's remaining
#   callbacks were skipped);
# - retransmissions exhausted for that peer: MessageManager._retransmit, a
#   loop timer, calls TokenManager.dispatch_error, which fails every request
#   to that peer; one whose future is cancelled raises out of the timer, into
#   the loop's exception handler, which in trio-asyncio re-raises it into the
#   loop's nursery and ends the node;
# - the block-wise runner finishing: logged at ERROR by _run_outer.
#
# trio-asyncio widens the windows: due timers run before queued callbacks, and
# each queued callback is a trio checkpoint at which socket readers run.
# The block-wise variant was reported upstream in 2020 (chrysn/aiocoap#210,
# closed) and is still in 0.4.17; the Request._run variant is the one that
# ended nodes.
# The fix is where the bug is: a requester whose future is cancelled has given
# up, so the event is dropped instead of set (asyncio's own
# futures._set_result_unless_cancelled does the same).


def _run_unless_abandoned(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap the generator ``Request._run`` so that events reaching a Request
    whose response future is already cancelled end it quietly (the pending
    done callback then finds nothing left to unhook)."""

    def _run(self: Any) -> Any:
        runner = original(self)
        ready = runner.send(None)
        while True:
            event = yield ready
            if self.response.cancelled():
                runner.close()
                return
            try:
                ready = runner.send(event)
            except StopIteration:
                return

    _run.__wrapped__ = original  # type: ignore[attr-defined]
    return _run


class _UnlessCancelled:
    """The response future as BlockwiseRequest's runner sees it: setting a
    result or exception on a cancelled future does nothing."""

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def set_result(self, result: Any) -> None:
        if not self._future.cancelled():
            self._future.set_result(result)

    def set_exception(self, exception: BaseException) -> None:
        if not self._future.cancelled():
            self._future.set_exception(exception)


def _install_abandon_guards() -> None:
    """Patch the two places of aiocoap (checked for 0.4.17's shape; fails
    loudly at import if it changed, rather than running unguarded)."""
    request_run = aiocoap.protocol.Request._run
    run_outer = aiocoap.protocol.BlockwiseRequest.__dict__.get("_run_outer")
    if getattr(request_run, "__wrapped__", None) is not None:
        return  # already installed (module reloaded)
    if not inspect.isgeneratorfunction(request_run) or not isinstance(run_outer, classmethod):
        raise RuntimeError("aiocoap's Request._run / BlockwiseRequest._run_outer changed shape; review _coap.py")
    aiocoap.protocol.Request._run = _run_unless_abandoned(request_run)  # type: ignore[method-assign]
    original_outer = run_outer.__func__

    async def _run_outer(
        cls: Any, app_request: Any, response: Any, weak_observation: Any, protocol: Any, log: Any
    ) -> None:
        await original_outer(cls, app_request, _UnlessCancelled(response), weak_observation, protocol, log)

    _run_outer.__wrapped__ = original_outer  # type: ignore[attr-defined]
    aiocoap.protocol.BlockwiseRequest._run_outer = classmethod(_run_outer)  # type: ignore[assignment,method-assign]


_install_abandon_guards()


class _LoopGuard:
    """Last line of defence on the asyncio loop: an exception that escapes an
    aiocoap callback (its traceback passes through aiocoap) is logged at ERROR
    with its traceback and counted, and the node keeps serving; anything else
    goes to the handler that was there before (trio-asyncio's re-raises).

    One per loop, shared by the transports on it, removed with the last.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.previous = loop.get_exception_handler()
        self.users = 0
        self.absorbed = 0
        self.budget = LogBudget()
        loop.set_exception_handler(self._handle)

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, Exception) and _raised_in_aiocoap(exc):
            self.absorbed += 1
            held = self.budget.allow(type(exc).__name__, time.monotonic())
            if held is not None:
                log.error(
                    "aiocoap callback failed (%d so far), serving on: %s%s",
                    self.absorbed,
                    context.get("message", ""),
                    held_back(held, self.budget.interval),
                    exc_info=exc,
                )
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            if self.loop.get_exception_handler() == self._handle:
                self.loop.set_exception_handler(self.previous)
            _LOOP_GUARDS.pop(self.loop, None)


_LOOP_GUARDS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopGuard] = weakref.WeakKeyDictionary()


def _loop_guard(loop: asyncio.AbstractEventLoop) -> _LoopGuard:
    guard = _LOOP_GUARDS.get(loop)
    if guard is None:
        guard = _LOOP_GUARDS[loop] = _LoopGuard(loop)
    guard.users += 1
    return guard


def _raised_in_aiocoap(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").startswith("aiocoap"):
            return True
        tb = tb.tb_next
    return False


class _RouteResource(aiocoap.resource.Resource):
    """One routed path. aiocoap reassembles Block1 and slices Block2 around
    :meth:`render`; render hands the whole payload to the trio side."""

    ct = CBOR_CONTENT_FORMAT  # advertised in /.well-known/core

    def __init__(self, transport: CoapTransport, resource: str) -> None:
        super().__init__()
        self._transport = transport
        self._resource = resource
        _bound_blockwise(self, transport._tuning.MAX_TRANSMIT_WAIT)

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
        handler_timeout: float = DEFAULT_HANDLER_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.address = format_address(bind, port)
        self.max_payload = max_payload
        self.stats = TransportStats()
        self._bind = (bind, port)
        self._loop = loop
        self._tuning = tuning if tuning is not None else MeshTuning()
        # The same parameters for one-way pushes, sent NON (aiocoap picks the type from
        # `reliability`; an mtype on the message is deprecated).
        self._one_way_tuning = copy.copy(self._tuning)
        self._one_way_tuning.reliability = False
        self._router = Router()
        self._dispatcher = Dispatcher(
            self._router, self.stats, max_payload, handler_timeout=handler_timeout, max_in_flight=max_in_flight
        )
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
        self._loop_guard: _LoopGuard | None = None
        self.internal_errors = 0
        """Requests that failed inside aiocoap's own bookkeeping (see `_repair_backlog`)."""
        self._waiting: dict[tuple[str, int], set[_Waiting]] = {}
        """Requests in progress by peer (host, port): a datagram from the peer moves their deadlines."""
        self._tagged: dict[bytes, _Waiting] = {}
        """Requests in progress by Request-Tag: a transmission of their message moves their deadline."""
        self.loop_late_max = 0.0
        """Most seconds the asyncio loop ran a due callback late (`_Watch`)."""
        self.backlog_max = 0
        """Longest per-peer backlog of aiocoap's confirmable messages seen (`_Watch`)."""
        self.extended = 0
        """Requests that outlived their ``timeout`` because the peer kept answering."""
        self._recent: _RecentMessages | None = None
        self._route_resources: list[_RouteResource] = []
        self._watch: _Watch | None = None

    def routes(self) -> list[tuple[str, str]]:
        """Every routed (path, method); see :meth:`Router.routes`."""
        return self._router.routes()

    def state_sizes(self) -> dict[str, int]:
        """Entries held on behalf of peers, for tests and the status page:
        message ids remembered, incomplete block-wise uploads and cached
        block-wise responses (all routes), requests being served."""
        sizes = {"dedup": len(self._recent) if self._recent is not None else 0}
        sizes["block1"] = sum(len(r._block1._assemblies) for r in self._route_resources)
        sizes["block2"] = sum(len(r._block2._completes) for r in self._route_resources)
        sizes["serving"] = len(self._handlers)
        return sizes

    @property
    def loop_errors(self) -> int:
        """Exceptions from aiocoap callbacks that the loop guard absorbed on
        this transport's loop (shared by the transports on one loop)."""
        return self._loop_guard.absorbed if self._loop_guard is not None else 0

    # -- Transport interface ----------------------------------------------

    def route(self, resource: str, handler: Handler, *, method: str = "POST") -> None:
        if self._router.add(resource, handler, method):
            routed = _RouteResource(self, resource)
            self._route_resources.append(routed)
            self._site.add_resource(check_resource(resource), routed)

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
        tag = self._next_request_tag()
        message.opt.request_tag = [tag]
        self.stats.requests_sent += 1
        self.stats.bytes_sent += len(body)
        response: aiocoap.Message | None = None
        waiting = _Waiting(trio.current_time(), timeout)
        key = _peer_key(*split_address(with_default_port(peer, COAP_PORT)))
        self._waiting.setdefault(key, set()).add(waiting)
        self._tagged[tag] = waiting
        try:
            with self._requests.track(), waiting.scope:
                response = await trio_asyncio.aio_as_trio(self._aio_request, loop=self._loop)(message)
            if waiting.scope.cancelled_caught and not self._closed:
                self.stats.errors += 1
                if waiting.extended:
                    self.extended += 1
                raise RequestTimeout(f"{what}: no answer within {timeout} s" + waiting.why(trio.current_time()))
        except (aiocoap.error.Error, OSError) as exc:
            self.stats.errors += 1
            raise translate_error(exc, what) from exc
        except (AssertionError, KeyError, asyncio.InvalidStateError) as exc:
            # aiocoap's own bookkeeping failed inside this request (its assertions
            # on per-peer exchanges, seen under loss and restarts): this request is
            # lost, the node is not. Logged as our failure, at a bounded rate.
            self.stats.errors += 1
            self.internal_errors += 1
            _internal_error_log(f"{what}: aiocoap internal error {type(exc).__name__}: {exc}")
            raise TransportError(f"{what}: aiocoap internal error ({type(exc).__name__})") from exc
        finally:
            self._tagged.pop(tag, None)
            peers = self._waiting.get(key)
            if peers is not None:
                peers.discard(waiting)
                if not peers:
                    del self._waiting[key]
        if response is None:
            self.stats.errors += 1
            raise TransportClosed(f"{what}: transport closed during the request")
        if waiting.extended:
            self.extended += 1
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
            code=Code.POST,
            payload=body,
            uri=f"coap://{peer}{resource}",
            transport_tuning=self._tuning if big else self._one_way_tuning,
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
            self._context = await trio_asyncio.aio_as_trio(aiocoap.Context.create_server_context, loop=self._loop)(
                self._site,
                bind=(host, port),
                loggername=AIOCOAP_LOGGER,
                transports=["udp6"],
            )
        except (OSError, aiocoap.error.Error) as exc:
            raise TransportError(f"cannot open CoAP transport on {self.address}: {exc}") from exc
        self._loop_guard = _loop_guard(self._loop)
        try:
            _guard_datagram_input(self._context, self._heard)
            (interface,) = self._context.request_interfaces
            self._recent = _bound_deduplication(interface.token_interface)
            _stop_sending_abandoned(interface.token_interface)
            _note_transmissions(interface.token_interface, self._sent, lambda: self._closed)
            self._watch = _Watch(self._loop, interface.token_interface, self)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio_asyncio.aio_as_trio(self._context.shutdown, loop=self._loop)()
            self._loop_guard.release()
            self._loop_guard = None
            raise
        log.debug("CoAP transport listening on %s", self.address)

    async def _close(self) -> None:
        """Stop: refuse new work, cancel handlers and requests in flight, wait
        for them, then shut the aiocoap context (closing the socket)."""
        self._closed = True
        if self._watch is not None:
            self._watch.stop()
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
        if self._loop_guard is not None:
            guard, self._loop_guard = self._loop_guard, None
            guard.release()
        log.debug("CoAP transport on %s closed", self.address)

    # -- internals ------------------------------------------------------------

    def _heard(self, data: bytes, address: Any) -> None:
        """A datagram came from `address` (a socket address). If it answers us
        (type ACK or RST, or a response code), the peer is alive and working
        through our requests: those in progress to it get `timeout` more (capped)."""
        if not self._waiting or len(data) < 2:
            return
        answer = (data[0] >> 4) & 0x3 >= 2 or data[1] >> 5 >= 2  # T = ACK/RST, or code class 2-5
        if not answer:
            return
        try:
            key = _peer_key(address[0], address[1])
        except (TypeError, IndexError, ValueError):
            return
        peers = self._waiting.get(key)
        if peers:
            now = trio.current_time()
            for waiting in peers:
                waiting.progress(now)

    def _sent(self, message: aiocoap.Message) -> None:
        """aiocoap put a confirmable request of ours on the wire (first send or a
        retransmission): the request it belongs to (by Request-Tag; every block
        of a block-wise request carries it), and every other request to that
        peer, get `timeout` from now."""
        if not self._tagged:
            return
        now = trio.current_time()
        tags = message.opt.request_tag
        waiting = self._tagged.get(tags[0]) if tags else None
        if waiting is not None:
            waiting.progress(now, sent=True)
        # The other requests to this peer: aiocoap sends one confirmable message
        # per peer at a time (NSTART = 1), so theirs may wait in its backlog behind
        # this one; their clock waits while aiocoap is still trying the peer. To a
        # silent peer they all end together, `timeout` after its last try.
        try:
            key = _peer_key(message.remote.sockaddr[0], message.remote.sockaddr[1])
        except (AttributeError, TypeError, IndexError, ValueError):
            return
        for queued in self._waiting.get(key, ()):
            if queued is not waiting:
                queued.progress(now, sent=True)

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
        return self._message(self._dispatcher.refuse(resource, remote_address(request.remote), refused))

    async def _render(self, resource: str, request: aiocoap.Message) -> aiocoap.Message:
        """asyncio side of serving: hand the reassembled request to trio.

        Counted so that closing can wait until every answer has been handed to
        aiocoap: aiocoap sends it synchronously once this returns.
        """
        self._renders += 1
        try:
            response: Response = await trio_asyncio.trio_as_aio(self._serve, loop=self._loop)(
                resource, request.code.name, bytes(request.payload), remote_address(request.remote)
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


def remote_address(remote: Any) -> str:
    """A requester's address as "host:port" / "[v6]:port", port always given.

    aiocoap's ``hostinfo`` leaves out the CoAP default port 5683 (URI style,
    RFC 7252 s6.1). Handlers record the requester's address and later send
    requests to it, which need a port: a node on the default port would be
    recorded as "10.78.0.4" and the next request to it refused as a bad
    address. Every remote address leaves the transport through here.
    """
    return with_default_port(remote.hostinfo, COAP_PORT)


class _RecentMessages(dict):  # type: ignore[type-arg]
    """aiocoap's deduplication cache (``MessageManager._recent_messages``,
    (remote, message id) -> response or None), bounded by age and count and
    kept without a timer per entry: entries are dropped as new ones arrive."""

    def __init__(self, lifetime: float, max_entries: int) -> None:
        super().__init__()
        self.lifetime = lifetime
        self.max_entries = max_entries
        self._added: collections.OrderedDict[Any, float] = collections.OrderedDict()

    def add(self, key: Any, now: float) -> None:
        while self._added:
            oldest, at = next(iter(self._added.items()))
            if at > now - self.lifetime and len(self._added) < self.max_entries:
                break
            del self._added[oldest]
            super().pop(oldest, None)
        self[key] = None
        self._added[key] = now
        self._added.move_to_end(key)

    def pop(self, key: Any, default: Any = None) -> Any:
        self._added.pop(key, None)
        return super().pop(key, default)


def _bound_deduplication(manager: Any) -> _RecentMessages:
    """Replace the message manager's deduplication with a bounded one (same
    behaviour as aiocoap 0.4.17's ``_deduplicate_message`` otherwise)."""
    if not isinstance(getattr(manager, "_recent_messages", None), dict) or not hasattr(manager, "_deduplicate_message"):
        raise RuntimeError("aiocoap's MessageManager changed shape; review _coap.py")
    recent = _RecentMessages(DEDUP_LIFETIME, DEDUP_MAX)
    manager._recent_messages = recent

    def _deduplicate_message(message: aiocoap.Message) -> bool:
        key = (message.remote, message.mid)
        if key in recent:
            if message.mtype is CON:
                stored = recent[key]
                if stored is not None:
                    manager.log.info("Duplicate CON received, sending old response again")
                    manager._send_initially(stored)
                else:
                    manager.log.info("Duplicate CON received, no response to send yet")
            else:
                manager.log.info("Duplicate NON, ACK or RST received")
            return True
        recent.add(key, manager.loop.time())
        return False

    manager._deduplicate_message = _deduplicate_message
    return recent


def _repair_backlog(manager: Any, message: aiocoap.Message) -> list[Any]:
    """Restore aiocoap's rule "a peer with a backlog has an active exchange".

    aiocoap 0.4.17 keeps, per peer, one active confirmable exchange and a backlog
    behind it (NSTART = 1), and asserts in `send_message` that a backlog never
    exists without its exchange. Under loss and restarts the field suite saw that
    rule broken (an exchange ended by a path that left its backlog behind): the
    assertion then failed inside a request and ended the node, and every later
    request to that peer failed the same way. An orphaned backlog would never be
    sent, so it is taken here and put back behind this message, which starts a
    new exchange. Returns the orphaned entries (usually none).
    """
    remote = message.remote
    backlogs, exchanges = manager._backlogs, manager._active_exchanges
    if exchanges is None or remote is None or remote not in backlogs:
        return []
    if any(r == remote for r, _ in exchanges):
        return []
    orphaned = backlogs.pop(remote)
    log.info("aiocoap backlog to %s had no active exchange (%d queued): repaired", remote, len(orphaned))
    manager._repaired_backlogs = getattr(manager, "_repaired_backlogs", 0) + 1
    return orphaned


def _stop_sending_abandoned(manager: Any) -> None:
    """Let a request that its requester gave up stop being sent.

    aiocoap's TokenManager asks the layer below for a "send canceller" and
    calls it on the request's first event, and when interest in the request
    ends (its future was cancelled); 0.4.17's MessageManager returns none.
    So a request we gave up on kept its place: retransmitted for up to
    MAX_TRANSMIT_WAIT (11 s with :class:`MeshTuning`), holding the one
    exchange aiocoap allows per peer (NSTART = 1, RFC 7252 s4.7) and keeping
    every later request to that peer in the backlog, and a request given up
    while still in the backlog was sent anyway, later, to nobody. Against an
    overloaded peer that is overload feeding itself. Here the canceller drops
    the message from the backlog, or ends its exchange (no more
    retransmissions; the next message in the backlog goes out).
    """
    send = manager.send_message
    if not callable(send) or not isinstance(getattr(manager, "_backlogs", None), dict):
        raise RuntimeError("aiocoap's MessageManager changed shape; review _coap.py")  # noqa: TRY004

    def send_message(message: aiocoap.Message, messageerror_monitor: Any) -> Callable[[], None] | None:
        orphaned = _repair_backlog(manager, message)
        canceller = send(message, messageerror_monitor)
        if orphaned:
            remote = message.remote
            manager._backlogs.setdefault(remote, []).extend(orphaned)
            if manager._active_exchanges is not None and not any(r == remote for r, _ in manager._active_exchanges):
                manager._continue_backlog(remote)  # this message was no exchange (NON): start the queue
        if canceller is not None or message.mtype is not CON or not message.code.is_request():
            return canceller
        remote, key = message.remote, (message.remote, message.mid)

        def cancel() -> None:
            exchanges = manager._active_exchanges
            if exchanges is None:  # shutting down
                return
            backlog = manager._backlogs.get(remote)
            if backlog:
                backlog[:] = [entry for entry in backlog if entry[0] is not message]
            entry = exchanges.pop(key, None)
            if entry is not None:
                entry[1].cancel()  # the retransmission timer
                # Not now: cancel runs inside aiocoap's own dispatch (an ICMP error
                # read while sending fails every request to that peer in a loop),
                # and sending the next message from here re-entered the UDP send
                # ("send was reentered in a single task") and aiocoap's backlog
                # walk (KeyError). The next loop turn is outside all of that.
                manager.loop.call_soon(_continue_backlog_later, manager, remote)

        return cancel

    manager.send_message = send_message


def _note_transmissions(
    manager: Any, sent: Callable[[aiocoap.Message], None], closed: Callable[[], bool], copies: int = NON_COPIES
) -> None:
    """Call `sent` with every confirmable request aiocoap's MessageManager puts on
    the wire, first sends and retransmissions alike (both go through
    ``_send_via_transport``; 0.4.17's shape, checked here); and send each
    one-way NON request (No-Response 26) `copies` more times (`NON_COPIES`)."""
    send = getattr(manager, "_send_via_transport", None)
    if not callable(send) or getattr(manager, "message_interface", None) is None:
        raise RuntimeError("aiocoap's MessageManager changed shape; review _coap.py")

    def again(message: aiocoap.Message) -> None:
        if closed() or manager._active_exchanges is None:  # shut down meanwhile
            return
        try:
            manager.message_interface.send(message)
        except Exception:  # noqa: BLE001 - a copy is best effort
            log.debug("sending a copy of a one-way message failed", exc_info=True)

    def _send_via_transport(message: aiocoap.Message) -> None:
        send(message)
        if not message.code.is_request():
            return
        if message.mtype is CON:
            try:
                sent(message)
            except Exception:  # noqa: BLE001 - bookkeeping must not fail a send
                log.debug("noting a transmission failed", exc_info=True)
        elif message.mtype is NON and message.opt.no_response == NO_RESPONSE_ALL:
            tuning = message.transport_tuning
            delay = 0.0
            for n in range(copies):
                delay += tuning.ACK_TIMEOUT * (2**n) * random.uniform(1.0, tuning.ACK_RANDOM_FACTOR)
                manager.loop.call_later(delay, again, message)

    manager._send_via_transport = _send_via_transport


def _continue_backlog_later(manager: Any, remote: Any) -> None:
    """Send the next message queued for `remote` if no exchange with it is active
    (what aiocoap does when an exchange ends), unless someone already did."""
    exchanges = manager._active_exchanges
    if exchanges is None or remote not in manager._backlogs:  # shut down, or nothing queued
        return
    if any(r == remote for r, _ in exchanges):
        return
    manager._continue_backlog(remote)


class _BoundedTimeoutDict(TimeoutDict):  # type: ignore[misc]
    """aiocoap's TimeoutDict with a most number of entries, oldest out first."""

    def __init__(self, timeout: float, max_entries: int) -> None:
        super().__init__(timeout)
        self.max_entries = max_entries

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self._items:
            while len(self._items) >= self.max_entries:
                del self._items[next(iter(self._items))]
        super().__setitem__(key, value)

    def __len__(self) -> int:
        return len(self._items)


def _bound_blockwise(resource: aiocoap.resource.Resource, timeout: float) -> None:
    spool, cache = getattr(resource, "_block1", None), getattr(resource, "_block2", None)
    if not isinstance(spool, aiocoap.blockwise.Block1Spool) or not isinstance(cache, aiocoap.blockwise.Block2Cache):
        raise RuntimeError(  # noqa: TRY004 (a changed library, not a caller's type)
            "aiocoap's block-wise spools changed shape; review _coap.py"
        )
    spool._assemblies = _BoundedTimeoutDict(timeout, BLOCKWISE_MAX)
    cache._completes = _BoundedTimeoutDict(timeout, BLOCK2_CACHE_MAX)


WATCH_PERIOD = 0.5
"""Seconds between two looks of the transport's watch (`_Watch`) while requests
are in progress; `WATCH_IDLE` while none is (each look costs a timer of the
trio-asyncio loop: at 0.1 s the watch alone was 0.5 % of a core, twice an idle
node's whole cost)."""
WATCH_IDLE = 5.0
WATCH_REPORT = 30.0
"""Seconds between two of its summary lines (only when something was late or queued)."""


class _Watch:
    """Measures what the peers of a slow mesh wait for, and logs it at a bounded rate.

    Every `WATCH_PERIOD` (`WATCH_IDLE` while no request is in progress) it notes
    how late the asyncio loop ran the callback (a loop that runs late answers
    late: a peer retransmits after 0.5 s), and the
    largest per-peer backlog of aiocoap's confirmable messages (NSTART = 1: one
    exchange per peer at a time, the rest wait). Every `WATCH_REPORT` seconds in
    which the loop ran over 0.25 s late or a backlog held over 8 messages, one
    INFO line: the p50, p95 and worst lateness, the longest backlog and the
    requests waiting. The figures are also kept on the transport (`loop_late_max`,
    `backlog_max`) for tests.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, manager: Any, transport: CoapTransport) -> None:
        self._loop, self._manager, self._transport = loop, manager, transport
        self._lates: list[float] = []
        self._backlog_max = 0
        self._since = loop.time()
        self._due = self._since + WATCH_PERIOD
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = self._loop.time()
        late = max(0.0, now - self._due)
        self._lates.append(late)
        backlogs = getattr(self._manager, "_backlogs", None) or {}
        longest = max((len(b) for b in backlogs.values()), default=0)
        self._backlog_max = max(self._backlog_max, longest)
        self._transport.loop_late_max = max(self._transport.loop_late_max, late)
        self._transport.backlog_max = max(self._transport.backlog_max, longest)
        if now - self._since >= WATCH_REPORT:
            lates = sorted(self._lates)
            worst = lates[-1] if lates else 0.0
            if worst > 0.25 or self._backlog_max > 8:
                log.info(
                    "transport watch over %.0f s: loop late p50 %.3f s, p95 %.3f s, max %.3f s; "
                    "longest aiocoap backlog %d; requests waiting %d to %d peers; %d extended so far",
                    now - self._since,
                    lates[len(lates) // 2],
                    lates[int(len(lates) * 0.95)],
                    worst,
                    self._backlog_max,
                    sum(len(w) for w in self._transport._waiting.values()),
                    len(self._transport._waiting),
                    self._transport.extended,
                )
            self._lates, self._backlog_max, self._since = [], 0, now
        busy = bool(self._transport._waiting) or bool(backlogs)
        self._due = now + (WATCH_PERIOD if busy else WATCH_IDLE)
        self._handle = self._loop.call_at(self._due, self._tick)


class _Waiting:
    """The deadline of one request in progress: `timeout` after the last datagram
    from its peer or the last transmission of its message, at most `PROGRESS_CAP`
    * `timeout` after the start."""

    __slots__ = ("cap", "extended", "retried", "scope", "start", "timeout")

    def __init__(self, start: float, timeout: float) -> None:
        self.start, self.timeout = start, timeout
        self.cap = timeout * PROGRESS_CAP
        self.scope = trio.CancelScope(deadline=start + timeout)
        self.extended = False
        """The peer's answers moved the deadline past `timeout`."""
        self.retried = False
        """A retransmission moved it (the try after it had its `timeout`)."""

    def why(self, now: float) -> str:
        """What the timeout message adds: whether the peer had answered, and which bound ended it."""
        if not self.extended:
            if self.retried:
                return f" of its last try ({now - self.start:.1f} s in all)"
            return ""
        if self.scope.deadline >= self.start + self.cap:
            return f" (the peer answered, but not in full within {self.cap:g} s)"
        return f" (the peer answered, then nothing for {self.timeout:g} s; {now - self.start:.1f} s in all)"

    def progress(self, now: float, *, sent: bool = False) -> None:
        """The peer answered (`sent` False), or a try of ours went out (True), at `now`."""
        deadline = min(now + self.timeout, self.start + self.cap)
        if deadline > self.scope.deadline:
            if deadline > self.start + self.timeout:
                if sent:
                    self.retried = True
                else:
                    self.extended = True
            self.scope.deadline = deadline


def _peer_key(host: str, port: int) -> tuple[str, int]:
    """One form for a peer's address, as written in a request and as a socket reports it."""
    host = host.strip("[]").lower()
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return host, int(port)


def _guard_datagram_input(context: aiocoap.Context, heard: Callable[[bytes, Any], None] | None = None) -> None:
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
        if endpoint is None or receive is None:
            continue
        endpoint.datagram_msg_received = _drop_on_error(receive, heard)
        guarded += 1
    if guarded != 1:
        raise RuntimeError(f"expected one aiocoap UDP endpoint to guard, found {guarded}; aiocoap internals changed")


DROPPED_DATAGRAMS = LogBudget()
"""Datagrams dropped because handling them raised, by exception type."""


def _drop_on_error(
    receive: Callable[[bytes, Any, int, Any], None], heard: Callable[[bytes, Any], None] | None = None
) -> Callable[[bytes, Any, int, Any], None]:
    def guarded_receive(data: bytes, ancdata: Any, flags: int, address: Any) -> None:
        try:
            if heard is not None:
                heard(data, address)
            receive(data, ancdata, flags, address)
        except Exception as exc:  # noqa: BLE001 (the point: no datagram may stop the node)
            held = DROPPED_DATAGRAMS.allow(type(exc).__name__, time.monotonic())
            if held is not None:
                log.warning(
                    "dropped a datagram of %d bytes from %s: %r%s",
                    len(data),
                    address,
                    exc,
                    held_back(held, DROPPED_DATAGRAMS.interval),
                )

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
    handler_timeout: float = DEFAULT_HANDLER_TIMEOUT,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
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
        handler_timeout: longest a handler may work on one request before it
            is cancelled and the request answered 5.03 (the requester has
            given up by then; UDP cannot say so).
        max_in_flight: most requests served at once; one more is answered
            5.03 at once (load is shed, not queued).

    Raises:
        TransportError: the address cannot be bound (in use, not local).
        RuntimeError: not inside ``trio_asyncio.open_loop()``.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535, got {port}")
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        raise RuntimeError("open_coap_transport must run inside trio_asyncio.open_loop()")
    transport = CoapTransport(
        loop,
        bind,
        port,
        max_payload=max_payload,
        tuning=tuning,
        handler_timeout=handler_timeout,
        max_in_flight=max_in_flight,
    )
    await transport._open()
    try:
        yield transport
    finally:
        with trio.CancelScope(shield=True):
            await transport._close()
