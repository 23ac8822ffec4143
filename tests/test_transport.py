"""Conformance suite for the Transport seam, run against both implementations.

Every test that takes the ``rig`` fixture runs twice: on :class:`MemoryNetwork`
transports and on real CoAP transports bound to distinct loopback addresses
(127.0.0.2, 127.0.0.3, ...) sharing one free port, so the fake cannot drift
from the wire. Tests below the conformance section exercise what only one
implementation has (virtual-time exactness of the fake; link format, garbage
datagrams, content formats of CoAP).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

import aiocoap
import pytest
import trio
import trio.testing
import trio_asyncio

from meshnode._coap import CBOR_CONTENT_FORMAT, block1_extent, open_coap_transport
from meshnode._transport import (
    DEFAULT_MAX_PAYLOAD,
    BadAddress,
    BadRequest,
    Forbidden,
    MemoryNetwork,
    NotFound,
    PayloadTooLarge,
    PeerUnreachable,
    RemoteRefused,
    RequestRefused,
    RequestTimeout,
    Router,
    Transport,
    TransportClosed,
    TransportError,
    Unauthorized,
    format_address,
    split_address,
)

KB = 1024


# --------------------------------------------------------------------------
# Rigs: how to make transports of each kind


def _free_port(hosts: list[str]) -> int:
    """A UDP port that is free on every one of ``hosts`` right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first:
            first.bind((hosts[0], 0))
            port = first.getsockname()[1]
            try:
                for host in hosts[1:]:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                        other.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no common free UDP port on the loopback addresses")


class MemoryRig:
    """Transports on one MemoryNetwork at 10.0.0.x:5683."""

    name = "memory"
    unreachable_error: type[TransportError] = RequestTimeout

    def __init__(self) -> None:
        self.net = MemoryNetwork()

    def address(self, i: int) -> str:
        return f"10.0.0.{i}:5683"

    @asynccontextmanager
    async def environment(self) -> AsyncIterator[None]:
        yield

    def transport(self, address: str, **kwargs: int) -> AbstractAsyncContextManager[Transport]:
        return self.net.transport(address, **kwargs)

    def unreachable_address(self) -> str:
        """Nobody there: the fake, like UDP without ICMP, stays silent."""
        return "10.0.0.250:5683"

    @asynccontextmanager
    async def silent_address(self) -> AsyncIterator[str]:
        yield "10.0.0.251:5683"

    async def tasks_settle(self) -> None:
        await trio.testing.wait_all_tasks_blocked()


class CoapRig:
    """CoAP transports on 127.0.0.2, .3, ... sharing one free port."""

    name = "coap"
    unreachable_error: type[TransportError] = PeerUnreachable
    hosts = [f"127.0.0.{i}" for i in (2, 3, 4, 5, 250, 251)]

    def __init__(self) -> None:
        self.port = _free_port(self.hosts)

    def address(self, i: int) -> str:
        return f"127.0.0.{i + 1}:{self.port}"

    @asynccontextmanager
    async def environment(self) -> AsyncIterator[None]:
        async with trio_asyncio.open_loop():
            yield

    def transport(self, address: str, **kwargs: int) -> AbstractAsyncContextManager[Transport]:
        host, port = split_address(address)
        return open_coap_transport(host, port, **kwargs)

    def unreachable_address(self) -> str:
        """Nothing bound: the kernel answers ICMP port unreachable."""
        return f"127.0.0.250:{self.port}"

    @asynccontextmanager
    async def silent_address(self) -> AsyncIterator[str]:
        """A socket that takes datagrams and never answers: a black hole."""
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.251", self.port))
            yield f"127.0.0.251:{self.port}"

    async def tasks_settle(self) -> None:
        await trio.testing.wait_all_tasks_blocked()


Rig = MemoryRig | CoapRig


@pytest.fixture(params=["memory", "coap"])
def rig(request: pytest.FixtureRequest) -> Rig:
    return MemoryRig() if request.param == "memory" else CoapRig()


@asynccontextmanager
async def open_nodes(rig: Rig, n: int = 2, **kwargs: int) -> AsyncIterator[list[Transport]]:
    """``n`` transports at ``rig.address(1..n)``, inside the rig's environment."""
    async with rig.environment(), AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(rig.transport(rig.address(i), **kwargs)) for i in range(1, n + 1)]
        yield nodes


def echo_handler(log: list[tuple[bytes, str]] | None = None) -> Callable[[bytes, str], Awaitable[bytes]]:
    async def handler(payload: bytes, remote: str) -> bytes:
        if log is not None:
            log.append((payload, remote))
        return payload

    return handler


def all_trio_tasks() -> set[trio.lowlevel.Task]:
    tasks: set[trio.lowlevel.Task] = set()
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None or task in tasks:
            continue
        tasks.add(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return tasks


# --------------------------------------------------------------------------
# Conformance


async def test_round_trip_passes_bytes_and_requester_address(rig: Rig) -> None:
    async with open_nodes(rig, 2) as (a, b):
        seen: list[tuple[bytes, str]] = []
        a.route("/m/echo", echo_handler(seen))
        assert await b.request(a.address, "/m/echo", b"\xa1\x01\x02") == b"\xa1\x01\x02"
        assert await b.request(a.address, "/m/echo") == b""
        # One socket per node: the requester is seen at its own serving address.
        assert seen == [(b"\xa1\x01\x02", b.address), (b"", b.address)]


async def test_get_route_and_method_not_allowed(rig: Rig) -> None:
    async with open_nodes(rig, 2) as (a, b):

        async def status(payload: bytes, remote: str) -> bytes:
            return b"\xa1\x62ok\xf5"

        a.route("/m/status", status, method="GET")
        assert await b.request(a.address, "/m/status", method="GET") == b"\xa1\x62ok\xf5"
        with pytest.raises(RemoteRefused) as info:
            await b.request(a.address, "/m/status", b"x", method="POST")
        assert info.value.code == "4.05"
        # Routes can be added while serving, and both methods on one path.
        a.route("/m/status", echo_handler(), method="POST")
        assert await b.request(a.address, "/m/status", b"x") == b"x"


async def test_fifty_concurrent_requests(rig: Rig) -> None:
    async with open_nodes(rig, 3) as (a, b, c):
        a.route("/m/echo", echo_handler())
        results: dict[tuple[int, int], bytes] = {}

        async def one(client: Transport, i: int) -> None:
            payload = f"request {i} from {client.address}".encode()
            results[(id(client), i)] = await client.request(a.address, "/m/echo", payload)
            assert results[(id(client), i)] == payload

        async with trio.open_nursery() as nursery:
            for i in range(25):
                nursery.start_soon(one, b, i)
                nursery.start_soon(one, c, i)
        assert len(results) == 50


async def test_300kb_request_and_300kb_response(rig: Rig) -> None:
    async with open_nodes(rig, 2) as (a, b):
        big = random.Random(7).randbytes(300 * KB)

        async def digest(payload: bytes, remote: str) -> bytes:
            return len(payload).to_bytes(4, "big") + payload[-16:]

        async def blob(payload: bytes, remote: str) -> bytes:
            return big

        a.route("/m/upload", digest)
        a.route("/m/blob", blob, method="GET")
        assert await b.request(a.address, "/m/upload", big) == (300 * KB).to_bytes(4, "big") + big[-16:]
        assert await b.request(a.address, "/m/blob", method="GET") == big


async def test_concurrent_large_requests_to_one_path_stay_separate(rig: Rig) -> None:
    """Block-wise uploads from one peer to one path at the same time must not
    be spliced together (CoAP needs a Request-Tag per request for this)."""
    async with open_nodes(rig, 2) as (a, b):
        a.route("/m/sync", echo_handler())

        async def one(i: int) -> None:
            payload = bytes([i]) * (5 * KB + i)
            assert await b.request(a.address, "/m/sync", payload) == payload

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(one, i)


@pytest.mark.parametrize(
    ("refusal", "code"),
    [(BadRequest, "4.00"), (Unauthorized, "4.01"), (Forbidden, "4.03"), (NotFound, "4.04"), (PayloadTooLarge, "4.13")],
)
async def test_handler_refusal_maps_to_code_and_server_keeps_serving(
    rig: Rig, refusal: type[RequestRefused], code: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_nodes(rig, 2) as (a, b):

        async def refuse(payload: bytes, remote: str) -> bytes:
            raise refusal(f"no: {payload.decode()} ü")

        a.route("/m/refuse", refuse)
        a.route("/m/echo", echo_handler())
        with caplog.at_level(logging.WARNING, logger="meshnode"):
            with pytest.raises(RemoteRefused) as info:
                await b.request(a.address, "/m/refuse", b"why")
        assert (info.value.code, info.value.message) == (code, "no: why ü")
        assert any(r.levelno == logging.WARNING and code in r.getMessage() for r in caplog.records)
        assert await b.request(a.address, "/m/echo", b"next") == b"next"


async def test_refusal_from_a_handlers_child_task_keeps_its_code(rig: Rig) -> None:
    async with open_nodes(rig, 2) as (a, b):

        async def fan_out(payload: bytes, remote: str) -> bytes:
            async def check() -> None:
                raise Unauthorized("unknown sender")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(check)
            return b"unreachable"

        a.route("/m/fan", fan_out)
        with pytest.raises(RemoteRefused) as info:
            await b.request(a.address, "/m/fan")
        assert (info.value.code, info.value.message) == ("4.01", "unknown sender")


async def test_default_refusal_message(rig: Rig) -> None:
    async with open_nodes(rig, 2) as (a, b):

        async def refuse(payload: bytes, remote: str) -> bytes:
            raise Forbidden

        a.route("/m/refuse", refuse)
        with pytest.raises(RemoteRefused) as info:
            await b.request(a.address, "/m/refuse")
        assert (info.value.code, info.value.message) == ("4.03", "forbidden")


async def test_handler_crash_is_500_logged_and_server_keeps_serving(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    async with open_nodes(rig, 2) as (a, b):

        async def crash(payload: bytes, remote: str) -> bytes:
            raise KeyError("secret internal detail")

        async def not_bytes(payload: bytes, remote: str) -> bytes:
            return {"not": "bytes"}  # type: ignore[return-value]

        a.route("/m/crash", crash)
        a.route("/m/wrong", not_bytes)
        a.route("/m/echo", echo_handler())
        with caplog.at_level(logging.ERROR, logger="meshnode"):
            with pytest.raises(RemoteRefused) as info:
                await b.request(a.address, "/m/crash")
        assert info.value.code == "5.00"
        assert "secret" not in info.value.message
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and errors[0].exc_info is not None
        with pytest.raises(RemoteRefused) as info:
            await b.request(a.address, "/m/wrong")
        assert info.value.code == "5.00"
        assert await b.request(a.address, "/m/echo", b"still here") == b"still here"


async def test_unknown_resource_is_404(rig: Rig) -> None:
    async with open_nodes(rig, 2) as (a, b):
        a.route("/m/echo", echo_handler())
        for path in ("/m/nope", "/m", "/m/echo/deeper"):
            with pytest.raises(RemoteRefused) as info:
                await b.request(a.address, path, b"x")
            assert info.value.code == "4.04"


async def test_oversized_request_is_413_without_calling_handler(rig: Rig) -> None:
    async with open_nodes(rig, 2, max_payload=10 * KB) as (a, b):
        calls: list[tuple[bytes, str]] = []
        a.route("/m/echo", echo_handler(calls))
        assert a.max_payload == 10 * KB
        with pytest.raises(RemoteRefused) as info:
            await b.request(a.address, "/m/echo", bytes(10 * KB + 1))
        assert info.value.code == "4.13"
        assert calls == []
        assert a.stats.requests_received == 1  # refused once, not per block
        assert await b.request(a.address, "/m/echo", bytes(10 * KB)) == bytes(10 * KB)
        assert len(calls) == 1


async def test_default_max_payload(rig: Rig) -> None:
    async with open_nodes(rig, 1) as (a,):
        assert a.max_payload == DEFAULT_MAX_PAYLOAD == 4 * 1024 * 1024


async def test_unreachable_peer(rig: Rig) -> None:
    async with open_nodes(rig, 1) as (a,):
        with pytest.raises(rig.unreachable_error):
            await a.request(rig.unreachable_address(), "/m/echo", b"x", timeout=0.5)
        assert issubclass(rig.unreachable_error, TransportError)


async def test_bad_peer_address_is_a_transport_error(rig: Rig) -> None:
    """A peer address learned from the network may be malformed; requesting it
    must fail like any exchange (a TransportError callers handle), not with
    an exception nothing catches."""
    async with open_nodes(rig, 1) as (a,):
        for bad in ("10.78.0.4", "127.0.0.525:5683x", "[::1]", ""):
            with pytest.raises(BadAddress) as caught:
                await a.request(bad, "/m/echo", b"x")
            assert isinstance(caught.value, TransportError) and isinstance(caught.value, ValueError)


async def test_silent_peer_times_out(rig: Rig) -> None:
    async with open_nodes(rig, 1) as (a,), rig.silent_address() as silent:
        start = trio.current_time()
        with pytest.raises(RequestTimeout):
            await a.request(silent, "/m/echo", b"x", timeout=0.3)
        assert trio.current_time() - start >= 0.3


async def test_timeout_bounds_a_slow_handler(rig: Rig) -> None:
    async with open_nodes(rig, 2) as (a, b):
        release = trio.Event()

        async def stuck(payload: bytes, remote: str) -> bytes:
            await release.wait()
            return b"late"

        a.route("/m/stuck", stuck)
        a.route("/m/echo", echo_handler())
        start = trio.current_time()
        with pytest.raises(RequestTimeout):
            await b.request(a.address, "/m/stuck", b"x", timeout=0.3)
        assert trio.current_time() - start >= 0.3
        # The stuck handler does not block other requests to the same node.
        assert await b.request(a.address, "/m/echo", b"y") == b"y"
        release.set()


async def test_handler_past_its_deadline_is_cancelled_and_answered_503(rig: Rig) -> None:
    """UDP cannot tell a server that its requester gave up, so a handler is
    bounded instead: past ``handler_timeout`` it is cancelled (it does not go
    on working for nobody) and the request is answered 5.03."""
    async with open_nodes(rig, 2, handler_timeout=0.5) as (a, b):
        events: list[str] = []

        async def stuck(payload: bytes, remote: str) -> bytes:
            try:
                await trio.sleep_forever()
            finally:
                events.append("cancelled")
            raise AssertionError("unreachable")

        a.route("/m/stuck", stuck)
        with pytest.raises(RequestTimeout):  # the requester gives up first
            await b.request(a.address, "/m/stuck", b"x", timeout=0.2)
        with trio.fail_after(5):
            while not events:
                await trio.sleep(0.05)
        assert events == ["cancelled"]
        with pytest.raises(RemoteRefused) as refused:  # a patient requester hears why
            await b.request(a.address, "/m/stuck", b"y", timeout=3)
        assert refused.value.code == "5.03"
        assert a._dispatcher.abandoned == 2
        await rig.tasks_settle()


async def test_server_sheds_requests_beyond_max_in_flight_with_503(rig: Rig) -> None:
    """Overload is shed, not queued: with ``max_in_flight`` handlers running,
    one more request is answered 5.03 at once without calling its handler;
    the running ones finish normally."""
    async with open_nodes(rig, 2, max_in_flight=3) as (a, b):
        release = trio.Event()
        started: list[bytes] = []

        async def held(payload: bytes, remote: str) -> bytes:
            started.append(payload)
            await release.wait()
            return payload

        a.route("/m/held", held)
        answers: list[bytes] = []
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(lambda i=i: _append(answers, b.request(a.address, "/m/held", bytes([i]))))
            with trio.fail_after(5):
                while len(started) < 3:
                    await trio.sleep(0.01)
            with pytest.raises(RemoteRefused) as refused:
                await b.request(a.address, "/m/held", b"one too many", timeout=3)
            assert refused.value.code == "5.03" and len(started) == 3
            release.set()
        assert sorted(answers) == [b"\x00", b"\x01", b"\x02"]
        assert a._dispatcher.shed == 1 and a._dispatcher.in_flight == 0


async def _append(into: list[bytes], request: Awaitable[bytes]) -> None:
    into.append(await request)


async def test_stats_count_requests_bytes_and_errors(rig: Rig) -> None:
    async with open_nodes(rig, 2) as (a, b):
        a.route("/m/echo", echo_handler())

        async def refuse(payload: bytes, remote: str) -> bytes:
            raise BadRequest("bad")

        a.route("/m/refuse", refuse)
        await b.request(a.address, "/m/echo", b"12345")
        with pytest.raises(RemoteRefused):
            await b.request(a.address, "/m/refuse", b"xy")
        assert (b.stats.requests_sent, b.stats.bytes_sent, b.stats.bytes_received, b.stats.errors) == (
            2,
            7,
            5 + len(b"bad"),
            1,
        )
        # Request payloads count once accepted for a handler, refused or not.
        assert (a.stats.requests_received, a.stats.bytes_received, a.stats.bytes_sent, a.stats.errors) == (
            2,
            7,
            5 + len(b"bad"),
            1,
        )
        assert b.stats.requests_received == a.stats.requests_sent == 0


async def test_route_validation(rig: Rig) -> None:
    async with open_nodes(rig, 1) as (a,):
        a.route("/m/echo", echo_handler())
        with pytest.raises(ValueError):
            a.route("/m/echo", echo_handler())
        for bad_path in ("m/echo", "/m//echo", "/m/echo?x=1", "/"):
            with pytest.raises(ValueError):
                a.route(bad_path, echo_handler())
        with pytest.raises(ValueError):
            a.route("/m/put", echo_handler(), method="PUT")
        for bad_peer in ("nohost", "10.0.0.1", "10.0.0.1:0", "::1:5683"):
            with pytest.raises(ValueError):
                await a.request(bad_peer, "/m/echo")


async def test_address_in_use_is_refused(rig: Rig) -> None:
    async with open_nodes(rig, 1) as (a,):
        with pytest.raises(TransportError):
            async with rig.transport(a.address):
                pass


async def test_close_answers_inflight_request_with_503(rig: Rig) -> None:
    async with rig.environment(), rig.transport(rig.address(2)) as b:
        entered = trio.Event()
        cancelled = False

        async def stuck(payload: bytes, remote: str) -> bytes:
            nonlocal cancelled
            entered.set()
            try:
                await trio.sleep_forever()
            finally:
                cancelled = True

        outcome: list[BaseException] = []

        async def ask(address: str) -> None:
            try:
                await b.request(address, "/m/stuck", timeout=3.0)
            except TransportError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            async with rig.transport(rig.address(1)) as a:
                a.route("/m/stuck", stuck)
                nursery.start_soon(ask, a.address)
                await entered.wait()
        assert cancelled
        assert len(outcome) == 1 and isinstance(outcome[0], RemoteRefused)
        assert outcome[0].code == "5.03"


async def test_close_cancels_own_inflight_requests(rig: Rig) -> None:
    async with rig.environment(), rig.silent_address() as silent:
        outcome: list[BaseException] = []

        async with trio.open_nursery() as nursery:
            async with rig.transport(rig.address(1)) as a:

                async def ask() -> None:
                    try:
                        await a.request(silent, "/m/echo", timeout=3.0)
                    except TransportError as exc:
                        outcome.append(exc)

                nursery.start_soon(ask)
                await rig.tasks_settle()
        assert len(outcome) == 1 and isinstance(outcome[0], TransportClosed)
        with pytest.raises(TransportClosed):
            await a.request(silent, "/m/echo")


async def test_shutdown_frees_address_and_leaves_no_tasks(rig: Rig) -> None:
    async with rig.environment():
        await rig.tasks_settle()
        before = all_trio_tasks()
        for _ in range(2):  # the second round proves the address is free again
            async with rig.transport(rig.address(1)) as a, rig.transport(rig.address(2)) as b:
                a.route("/m/echo", echo_handler())
                assert await b.request(a.address, "/m/echo", bytes(3 * KB)) == bytes(3 * KB)
            await rig.tasks_settle()
            assert all_trio_tasks() == before
        if isinstance(rig, CoapRig):
            loop = trio_asyncio.current_loop.get()
            assert [t for t in asyncio.all_tasks(loop) if not t.done()] == []


# --------------------------------------------------------------------------
# Memory fake only: exact virtual time, links


async def test_memory_timeout_is_exact_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.transport("10.0.0.1:5683") as a, net.transport("10.0.0.2:5683", handler_timeout=20) as b:

        async def slow(payload: bytes, remote: str) -> bytes:
            await trio.sleep(10)
            return b"late"

        b.route("/m/slow", slow)
        start = trio.current_time()
        with pytest.raises(RequestTimeout):
            await a.request("10.0.0.9:5683", "/m/x", timeout=2.5)
        assert trio.current_time() - start == 2.5
        start = trio.current_time()
        with pytest.raises(RequestTimeout):
            await a.request(b.address, "/m/slow", timeout=4.0)
        assert trio.current_time() - start == 4.0
        start = trio.current_time()
        assert await a.request(b.address, "/m/slow", timeout=11.0) == b"late"
        assert trio.current_time() - start == 10.0


async def test_memory_handler_timeout_is_exact_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.transport("10.0.0.1:5683") as a, net.transport("10.0.0.2:5683", handler_timeout=3.0) as b:

        async def slow(payload: bytes, remote: str) -> bytes:
            await trio.sleep(10)
            return b"late"

        b.route("/m/slow", slow)
        start = trio.current_time()
        with pytest.raises(RemoteRefused, match="5.03"):
            await a.request(b.address, "/m/slow", timeout=11.0)
        assert trio.current_time() - start == 3.0


async def test_memory_set_link_cuts_both_directions(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with (
        net.transport("10.0.0.1:5683") as a,
        net.transport("10.0.0.2:5683") as b,
        net.transport("10.0.0.3:5683") as c,
    ):
        for t in (a, b, c):
            t.route("/m/echo", echo_handler())
        net.set_link(a.address, b.address, up=False)
        for src, dst in ((a, b), (b, a)):
            start = trio.current_time()
            with pytest.raises(RequestTimeout):
                await src.request(dst.address, "/m/echo", b"x", timeout=1.5)
            assert trio.current_time() - start == 1.5
        assert await a.request(c.address, "/m/echo", b"via c") == b"via c"
        net.set_link(b.address, a.address, up=True)
        assert await a.request(b.address, "/m/echo", b"back") == b"back"


async def test_memory_response_lost_when_link_cut_during_handler(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.transport("10.0.0.1:5683") as a, net.transport("10.0.0.2:5683") as b:
        handled = []

        async def slow(payload: bytes, remote: str) -> bytes:
            await trio.sleep(1)
            handled.append(payload)
            return payload

        b.route("/m/slow", slow)

        async def cut_later() -> None:
            await trio.sleep(0.5)
            net.set_link(a.address, b.address, up=False)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut_later)
            with pytest.raises(RequestTimeout):
                await a.request(b.address, "/m/slow", b"x", timeout=3)
        assert handled == [b"x"]  # the handler ran; only the answer was lost


async def test_memory_answer_after_the_requester_gave_up_goes_nowhere(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that answers after its requester timed out: the answer is dropped (not
    handed to the requester's next request), the handler's task ends cleanly and both
    transports keep serving."""
    net = MemoryNetwork()
    async with net.transport("10.0.0.1:5683") as a, net.transport("10.0.0.2:5683", handler_timeout=20) as b:
        answered: list[bytes] = []

        async def slow(payload: bytes, remote: str) -> bytes:
            await trio.sleep(5)
            answered.append(payload)
            return b"late " + payload

        b.route("/m/slow", slow)
        b.route("/m/echo", echo_handler())
        with caplog.at_level(logging.DEBUG, logger="meshnode.transport"):
            with pytest.raises(RequestTimeout):
                await a.request(b.address, "/m/slow", b"first", timeout=1.0)
            assert await a.request(b.address, "/m/echo", b"next") == b"next"
            await trio.sleep(10)
        assert answered == [b"first"]
        assert "dropped: requester gone" in caplog.text
        assert await a.request(b.address, "/m/slow", b"second", timeout=6.0) == b"late second"
        assert b._dispatcher.abandoned == 0 and len(b._handlers) == 0


async def test_memory_carries_copies_not_objects() -> None:
    net = MemoryNetwork()
    async with net.transport("10.0.0.1:5683") as a, net.transport("10.0.0.2:5683") as b:
        received: list[bytes] = []

        async def keep(payload: bytes, remote: str) -> bytes:
            received.append(payload)
            return bytearray(b"reply")  # type: ignore[return-value]

        b.route("/m/keep", keep)
        sent = bytearray(b"mutable")
        reply = await a.request(b.address, "/m/keep", sent)  # type: ignore[arg-type]
        sent[:] = b"changed"
        assert received == [b"mutable"] and type(received[0]) is bytes
        assert reply == b"reply" and type(reply) is bytes


# --------------------------------------------------------------------------
# CoAP only


@pytest.fixture
def coap_rig() -> CoapRig:
    return CoapRig()


async def test_coap_two_nodes_on_distinct_loopback_addresses_same_port(coap_rig: CoapRig) -> None:
    async with open_nodes(coap_rig, 2) as (a, b):
        (host_a, port_a), (host_b, port_b) = split_address(a.address), split_address(b.address)
        assert port_a == port_b and host_a != host_b
        a.route("/m/echo", echo_handler())
        b.route("/m/echo", echo_handler())
        assert await a.request(b.address, "/m/echo", b"a->b") == b"a->b"
        assert await b.request(a.address, "/m/echo", b"b->a") == b"b->a"


async def test_coap_well_known_core_and_content_formats(coap_rig: CoapRig) -> None:
    async with open_nodes(coap_rig, 2) as (a, b):
        a.route("/m/sync", echo_handler())
        a.route("/m/status", echo_handler(), method="GET")
        links = (await b.request(a.address, "/.well-known/core", method="GET")).decode()
        assert '</m/sync>;ct="60"' in links and '</m/status>;ct="60"' in links
        a.route("/m/digest", echo_handler())  # added while serving: listed at once
        assert "</m/digest>" in (await b.request(a.address, "/.well-known/core", method="GET")).decode()

        client = await trio_asyncio.aio_as_trio(aiocoap.Context.create_client_context)(transports=["udp6"])
        try:

            async def ask(message: aiocoap.Message) -> aiocoap.Message:
                return await client.request(message).response

            wkc = await trio_asyncio.aio_as_trio(ask)(
                aiocoap.Message(code=aiocoap.GET, uri=f"coap://{a.address}/.well-known/core")
            )
            assert wkc.opt.content_format == aiocoap.numbers.ContentFormat.LINKFORMAT
            ok = await trio_asyncio.aio_as_trio(ask)(
                aiocoap.Message(code=aiocoap.POST, payload=b"\x01", uri=f"coap://{a.address}/m/sync")
            )
            assert (ok.code.dotted, ok.opt.content_format, ok.payload) == ("2.04", CBOR_CONTENT_FORMAT, b"\x01")
            blockwise = await trio_asyncio.aio_as_trio(ask)(
                aiocoap.Message(code=aiocoap.POST, payload=bytes(5 * KB), uri=f"coap://{a.address}/m/sync")
            )
            assert (blockwise.code.dotted, blockwise.opt.content_format) == ("2.04", CBOR_CONTENT_FORMAT)
        finally:
            await trio_asyncio.aio_as_trio(client.shutdown)()


async def test_coap_413_carries_size1(coap_rig: CoapRig) -> None:
    async with coap_rig.environment(), coap_rig.transport(coap_rig.address(1), max_payload=2 * KB) as a:
        a.route("/m/sync", echo_handler())
        client = await trio_asyncio.aio_as_trio(aiocoap.Context.create_client_context)(transports=["udp6"])
        try:

            async def ask(message: aiocoap.Message) -> aiocoap.Message:
                return await client.request(message).response

            refused = await trio_asyncio.aio_as_trio(ask)(
                aiocoap.Message(code=aiocoap.POST, payload=bytes(50 * KB), uri=f"coap://{a.address}/m/sync")
            )
            assert refused.code.dotted == "4.13"
            assert refused.opt.size1 == 2 * KB
        finally:
            await trio_asyncio.aio_as_trio(client.shutdown)()


async def test_coap_garbage_datagrams_do_not_break_the_server(
    coap_rig: CoapRig, caplog: pytest.LogCaptureFixture
) -> None:
    """Includes datagrams that make aiocoap's decoder raise UnicodeDecodeError,
    which trio-asyncio would turn into the end of the whole loop."""
    async with open_nodes(coap_rig, 2) as (a, b):
        a.route("/m/echo", echo_handler())
        host, port = split_address(a.address)
        rng = random.Random(1234)
        datagrams = [rng.randbytes(rng.randrange(0, 200)) for _ in range(200)]
        # Near misses: valid CoAP headers with broken bodies.
        datagrams += [
            b"\x40",  # truncated header
            b"\x48\x02\x00\x01",  # token length 8, no token
            b"\x40\x02\x00\x02\xff",  # payload marker, no payload
            b"\x40\x02\x00\x03\xbd\xff\xff",  # option with bogus extended length
            b"\x41\x02\x00\x04\x00\xb1m\x21\xff" + bytes(10),  # block1 beyond any stream
            b"\x40\x02\x00\x05\xb1m\x04echo\xd1\x0e\xff\xff" + bytes(10),  # Block1 NUM huge
            b"\x70\x00\x00\x06",  # RST for nothing
        ]
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as raw:
            await raw.bind(("127.0.0.5", coap_rig.port))
            for datagram in datagrams:
                await raw.sendto(datagram, (host, port))
            await trio.sleep(0.05)
        assert await b.request(a.address, "/m/echo", b"after garbage") == b"after garbage"
        assert any(r.levelno == logging.WARNING and "dropped a datagram" in r.getMessage() for r in caplog.records)


async def test_coap_timeout_cancels_the_aiocoap_request(coap_rig: CoapRig) -> None:
    async with open_nodes(coap_rig, 1) as (a,), coap_rig.silent_address() as silent:
        with pytest.raises(RequestTimeout):
            await a.request(silent, "/m/echo", bytes(5 * KB), timeout=0.3)
        loop = trio_asyncio.current_loop.get()
        assert [t.get_name() for t in asyncio.all_tasks(loop) if not t.done()] == []


def test_block1_extent_is_a_lower_bound_on_the_total() -> None:
    assert block1_extent(0, 1024, 1024, None) == 1024
    assert block1_extent(0, 1024, 1024, 300 * KB) == 300 * KB
    assert block1_extent(9, 1024, 1024, 5) == 10 * KB  # lying Size1 caught by offsets
    assert block1_extent(2, 512, 100, None) == 1124


def test_addresses_round_trip() -> None:
    assert split_address("127.0.0.2:5683") == ("127.0.0.2", 5683)
    assert split_address("[::1]:5683") == ("::1", 5683)
    assert format_address("::1", 5683) == "[::1]:5683"
    assert format_address(*split_address("node-a.local:61616")) == "node-a.local:61616"


def test_router_rules() -> None:
    router = Router()

    async def handler(payload: bytes, remote: str) -> bytes:
        return payload

    assert router.add("/m/a", handler, "POST") is True
    assert router.add("/m/a", handler, "GET") is False
    assert router.paths() == ["/m/a"]
    assert router.lookup("/m/a", "GET") is handler
    with pytest.raises(NotFound):
        router.lookup("/m/b", "GET")
