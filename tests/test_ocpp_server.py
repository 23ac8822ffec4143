"""The OCPP server in-process, over real WebSockets on loopback: framing, errors, limits, commands.

The server runs on the trio-asyncio loop exactly as in `meshnode run`, wired to the
services of `test_ocpp_bridge.Rig` (a replica and a `commit` that records writes), so
"nothing stored" is checked on the commits and the replica. Charge points are the
`ocpp` library's 1.6 ChargePoint, or raw frames where the point is a broken frame.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio_asyncio
import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint as V16ChargePoint
from ocpp.v16 import call, call_result
from ocpp.v16.enums import Action

from meshnode.ocpp import OcppServer, RateLimit
from meshnode.ocpp._server import format_time
from meshnode.ocpp._v16 import V16Commands

from meshnode._security import Limits

from .test_ocpp_bridge import NOW_MS, Rig

pytestmark = pytest.mark.slow  # real sockets

HOST = "127.0.14.1"


@asynccontextmanager
async def serving(rig: Rig, **kwargs: Any) -> AsyncIterator[tuple[OcppServer, str]]:
    async with trio_asyncio.open_loop():
        server = OcppServer(rig.bridge, rig.site_config, **kwargs)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(server.serve, HOST, 0)
            yield server, f"ws://{host}:{port}/ocpp/"
            nursery.cancel_scope.cancel()


def aio(fn):
    """Run an asyncio coroutine function from the trio test (same loop as the server)."""
    return trio_asyncio.aio_as_trio(fn)


async def exchange(url: str, frames: list[str | bytes], *, subprotocols=("ocpp1.6",)) -> list[Any]:
    """Send frames one at a time over one connection; the parsed answer to each."""
    out = []
    async with websockets.connect(url, subprotocols=list(subprotocols)) as ws:
        for frame in frames:
            await ws.send(frame)
            out.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    return out


async def stopped(task: asyncio.Task[Any], ws: Any) -> None:
    """Close a charge point's connection and wait for its reader to end: a reader left
    behind, answering a node's CALL on the closed connection, fails with ConnectionClosed,
    which trio-asyncio raises in the test's loop after the test."""
    await ws.close()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, websockets.ConnectionClosed):
        pass


def heartbeat(uid: str = "hb") -> str:
    return json.dumps([2, uid, "Heartbeat", {}])


def no_sessions(rig: Rig) -> bool:
    return rig.session_docs() == [] and rig.commits == []


async def test_bad_frames_get_the_right_callerror_keep_the_connection_and_store_nothing():
    rig = Rig()
    start = {"connectorId": 1, "idTag": "TAG", "meterStart": 0, "timestamp": format_time(NOW_MS)}
    cases: list[tuple[str | bytes, str, str]] = [
        ("this is not json", "-1", "FormationViolation"),
        ('{"an": "object"}', "-1", "FormationViolation"),
        (b'[2, "bin", "Heartbeat", {}]', "-1", "FormationViolation"),  # OCPP-J is text frames
        (json.dumps([2, "u1", "MakeCoffee", {}]), "u1", "NotImplemented"),
        (json.dumps([2, "u2", "RemoteStartTransaction", {"idTag": "T"}]), "u2", "NotSupported"),
        (json.dumps([2, "u3", "StartTransaction", {k: v for k, v in start.items() if k != "idTag"}]), "u3",
         "OccurenceConstraintViolation"),
        (json.dumps([2, "u4", "StartTransaction", {**start, "connectorId": "one"}]), "u4", "TypeConstraintViolation"),
        (json.dumps([2, "u5", "StartTransaction", {**start, "idTag": "X" * 21}]), "u5", "TypeConstraintViolation"),
        (json.dumps([2, "u6", "StatusNotification", {"connectorId": 1, "errorCode": "NoError", "status": "Asleep"}]),
         "u6", "PropertyConstraintViolation"),
        (json.dumps([2, "u7", "StartTransaction", {**start, "coupon": 1}]), "u7", "FormationViolation"),
        (json.dumps([2, "u10", "StartTransaction", {**start, "meterStart": -1}]), "u10", "PropertyConstraintViolation"),
        (json.dumps([2, "u11", "StartTransaction", {**start, "idTag": "A\u0000B"}]), "u11",
         "PropertyConstraintViolation"),
        (json.dumps([2, "u12", "StopTransaction", {"meterStop": 2**60, "timestamp": start["timestamp"],
                                                   "transactionId": 1}]), "u12", "PropertyConstraintViolation"),
        (json.dumps([2, "u8", "StartTransaction", ["not", "an", "object"]]), "u8", "FormationViolation"),
        (json.dumps([2, 9, "Heartbeat", {}]), "9", "FormationViolation"),
    ]  # fmt: skip
    async with serving(rig) as (_, url):
        answers = await aio(exchange)(url + "CP-1", [frame for frame, _, _ in cases] + [heartbeat()])
    for (frame, uid, code), answer in zip(cases, answers):
        assert answer[:3] == [4, uid, code], (frame, answer)
    assert answers[-1][0] == 3 and "currentTime" in answers[-1][2]  # the connection still serves
    assert no_sessions(rig)


async def test_unsolicited_results_are_dropped():
    """A CALLRESULT nobody waits for would sit in the library's unbounded response queue."""
    rig = Rig()
    async with serving(rig) as (server, url):

        async def flood() -> int:
            async with websockets.connect(url + "CP-2", subprotocols=["ocpp1.6"]) as ws:
                for i in range(50):
                    await ws.send(json.dumps([3, f"r{i}", {}]))
                await ws.send(heartbeat())
                assert json.loads(await asyncio.wait_for(ws.recv(), 10))[0] == 3
                return server.handlers["CP-2"]._response_queue.qsize()

        assert await aio(flood)() == 0


async def test_path_and_subprotocol_are_checked_at_the_upgrade():
    rig = Rig()
    async with serving(rig) as (_, url):
        base = url.removesuffix("/ocpp/")

        async def status_of(target: str, subprotocols: list[str]) -> int:
            try:
                async with websockets.connect(target, subprotocols=subprotocols) as ws:
                    return 101 if ws.subprotocol == "ocpp1.6" else -1
            except websockets.InvalidStatus as exc:
                return exc.response.status_code

        assert await aio(status_of)(url + "CP-1", ["ocpp1.6"]) == 101
        assert await aio(status_of)(url + "CP-1", ["ocpp9.9"]) == 400
        assert await aio(status_of)(base + "/elsewhere/CP-1", ["ocpp1.6"]) == 404
        assert await aio(status_of)(url + "a%2Fb", ["ocpp1.6"]) == 404
        assert await aio(status_of)(url + "X" * 49, ["ocpp1.6"]) == 404
    assert rig.bridge.status_json()[0]["charger_id"] == "CP-1"


async def test_an_oversize_frame_closes_the_connection_and_the_server_goes_on():
    rig = Rig()
    async with serving(rig, max_frame=4096) as (_, url):

        async def oversize() -> int | None:
            async with websockets.connect(url + "CP-1", subprotocols=["ocpp1.6"], max_size=None) as ws:
                await ws.send(json.dumps([2, "big", "DataTransfer", {"vendorId": "v", "data": "x" * 5000}]))
                try:
                    await asyncio.wait_for(ws.recv(), 10)
                except websockets.ConnectionClosed as exc:
                    return exc.rcvd.code if exc.rcvd else None
            return None

        assert await aio(oversize)() == 1009
        answers = await aio(exchange)(url + "CP-1", [heartbeat()])
        assert answers[0][0] == 3
    assert no_sessions(rig)


def test_the_rate_limit_is_a_token_bucket():
    limit = RateLimit(rate=10.0, burst=3.0)
    assert [limit.delay(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.delay(0.0) == pytest.approx(0.1)
    assert limit.delay(0.0) == pytest.approx(0.2)
    assert limit.delay(10.0) == 0.0  # refilled, capped at the burst
    assert [limit.delay(10.0) for _ in range(2)] == [0.0, 0.0]
    assert limit.delay(10.0) == pytest.approx(0.1)


async def test_logins_beyond_the_upgrade_rate_get_503_before_any_work():
    rig = Rig()
    async with serving(rig, upgrades=RateLimit(rate=0.5, burst=3.0)) as (server, url):

        async def status_of() -> int:
            try:
                async with websockets.connect(url + "CP-1", subprotocols=["ocpp1.6"]):
                    return 101
            except websockets.InvalidStatus as exc:
                return exc.response.status_code

        statuses = [await aio(status_of)() for _ in range(6)]
    assert statuses[:3] == [101, 101, 101] and 503 in statuses[3:]
    assert server.counters["refused"] == statuses.count(503)


def test_a_refused_token_is_not_taken():
    limit = RateLimit(rate=1.0, burst=1.0)
    assert limit.try_take(0.0) and not limit.try_take(0.0) and not limit.try_take(0.5)
    assert limit.try_take(1.0)  # one second refilled one token: the refusals took none


async def test_a_flooding_charger_is_slowed_to_its_rate_and_others_are_served_meanwhile():
    rig = Rig()
    rate, burst, n = 40.0, 10.0, 70
    async with serving(rig, rate=rate, burst=burst) as (server, url):

        async def flood() -> float:
            async with websockets.connect(url + "FLOOD", subprotocols=["ocpp1.6"]) as ws:
                began = time.monotonic()
                for i in range(n):
                    await ws.send(heartbeat(f"h{i}"))
                for _ in range(n):
                    await asyncio.wait_for(ws.recv(), 30)
                return time.monotonic() - began

        async def polite() -> float:
            await asyncio.sleep(0.2)
            began = time.monotonic()
            await exchange(url + "POLITE", [heartbeat()])
            return time.monotonic() - began

        async def both() -> tuple[float, float]:
            return tuple(await asyncio.gather(flood(), polite()))  # type: ignore[return-value]

        flood_s, polite_s = await aio(both)()
    # A token bucket lets through at most burst + rate * t messages by time t.
    assert flood_s >= (n - burst) / rate * 0.95
    assert polite_s < (n - burst) / rate / 2


async def test_a_second_connection_with_the_same_id_replaces_the_first():
    rig = Rig()
    async with serving(rig) as (server, url):

        async def twice() -> int | None:
            async with websockets.connect(url + "CP-1", subprotocols=["ocpp1.6"]) as first:
                async with websockets.connect(url + "CP-1", subprotocols=["ocpp1.6"]) as second:
                    try:
                        await asyncio.wait_for(first.recv(), 10)
                    except websockets.ConnectionClosed as exc:
                        await second.send(heartbeat())
                        assert json.loads(await asyncio.wait_for(second.recv(), 10))[0] == 3
                        return exc.rcvd.code if exc.rcvd else None
            return None

        assert await aio(twice)() == 1000
        assert list(server.handlers) == []  # both closed now
    assert rig.bridge.status_json()[0]["connected"] is False


class CommandedCharger(V16ChargePoint):
    """A 1.6 charge point that accepts every command the node sends and records it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.local_list_version = 0

    def _got(self, action: str, **kwargs: Any) -> None:
        self.received.append((action, kwargs))

    @on(Action.remote_start_transaction)
    def remote_start(self, **kw: Any) -> Any:
        self._got("RemoteStartTransaction", **kw)
        return call_result.RemoteStartTransaction(status="Accepted")

    @on(Action.remote_stop_transaction)
    def remote_stop(self, **kw: Any) -> Any:
        self._got("RemoteStopTransaction", **kw)
        return call_result.RemoteStopTransaction(status="Accepted")

    @on(Action.change_availability)
    def change_availability(self, **kw: Any) -> Any:
        self._got("ChangeAvailability", **kw)
        return call_result.ChangeAvailability(status="Scheduled")

    @on(Action.reset)
    def reset(self, **kw: Any) -> Any:
        self._got("Reset", **kw)
        return call_result.Reset(status="Accepted")

    @on(Action.trigger_message)
    def trigger(self, **kw: Any) -> Any:
        self._got("TriggerMessage", **kw)
        return call_result.TriggerMessage(status="Accepted")

    @on(Action.get_configuration)
    def get_configuration(self, **kw: Any) -> Any:
        self._got("GetConfiguration", **kw)
        return call_result.GetConfiguration(
            configuration_key=[{"key": "HeartbeatInterval", "readonly": False, "value": "60"}]
        )

    @on(Action.change_configuration)
    def change_configuration(self, **kw: Any) -> Any:
        self._got("ChangeConfiguration", **kw)
        return call_result.ChangeConfiguration(status="Accepted")

    @on(Action.get_local_list_version)
    def get_local_list_version(self, **kw: Any) -> Any:
        self._got("GetLocalListVersion", **kw)
        return call_result.GetLocalListVersion(list_version=self.local_list_version)

    @on(Action.send_local_list)
    def send_local_list(self, **kw: Any) -> Any:
        self._got("SendLocalList", **kw)
        self.local_list_version = kw["list_version"]
        return call_result.SendLocalList(status="Accepted")


async def test_commands_reach_a_connected_charger_and_its_answers_come_back():
    rig = Rig()
    async with serving(rig) as (server, url):
        commands = V16Commands(server)
        connected = trio.Event()
        done = trio.Event()
        holder: dict[str, CommandedCharger] = {}

        async def charger() -> None:
            async with websockets.connect(url + "CP-1", subprotocols=["ocpp1.6"]) as ws:
                cp = holder["cp"] = CommandedCharger("CP-1", ws)
                task = asyncio.ensure_future(cp.start())
                await cp.call(call.Heartbeat())
                connected.set()
                await trio_asyncio.trio_as_aio(done.wait)()
                await stopped(task, ws)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(aio(charger))
            await connected.wait()
            assert await commands.remote_start("CP-1", "TAG", 1) == "Accepted"
            assert await commands.remote_stop("CP-1", 1234) == "Accepted"
            assert await commands.change_availability("CP-1", 0, False) == "Scheduled"
            assert await commands.reset("CP-1", hard=True) == "Accepted"
            assert await commands.trigger("CP-1", "StatusNotification", 1) == "Accepted"
            config = await commands.get_configuration("CP-1", ["HeartbeatInterval"])
            assert config.configuration_key[0]["value"] == "60"
            assert await commands.change_configuration("CP-1", "HeartbeatInterval", "30") == "Accepted"
            assert await commands.get_local_list_version("CP-1") == 0
            assert await commands.send_local_list("CP-1") == "Accepted"
            from meshnode.ocpp import ChargerNotConnected

            with pytest.raises(ChargerNotConnected):
                await commands.reset("CP-9")
            done.set()
    got = [(a, kw) for a, kw in holder["cp"].received if a != "GetLocalListVersion" or kw]
    assert [a for a, _ in holder["cp"].received if a != "GetLocalListVersion"] == [
        "RemoteStartTransaction", "RemoteStopTransaction", "ChangeAvailability", "Reset", "TriggerMessage",
        "GetConfiguration", "ChangeConfiguration", "SendLocalList",
    ]  # fmt: skip
    assert got[0] == ("RemoteStartTransaction", {"id_tag": "TAG", "connector_id": 1})
    assert ("Reset", {"type": "Hard"}) in got and ("RemoteStopTransaction", {"transaction_id": 1234}) in got


async def test_the_charger_is_told_to_stop_when_its_session_reaches_its_offline_limit():
    rig = Rig(limits=Limits(max_wh=500))
    async with serving(rig) as (_, url):

        async def charger() -> list[tuple[str, dict[str, Any]]]:
            async with websockets.connect(url + "CP-1", subprotocols=["ocpp1.6"]) as ws:
                cp = CommandedCharger("CP-1", ws)
                task = asyncio.ensure_future(cp.start())
                started = await cp.call(
                    call.StartTransaction(
                        connector_id=1, id_tag="STRANGER", meter_start=0, timestamp=format_time(NOW_MS)
                    )
                )
                for wh in (300, 700):
                    await cp.call(
                        call.MeterValues(
                            connector_id=1,
                            transaction_id=started.transaction_id,
                            meter_value=[{"timestamp": format_time(NOW_MS), "sampledValue": [{"value": str(wh)}]}],
                        )
                    )
                for _ in range(100):
                    if any(a == "RemoteStopTransaction" for a, _ in cp.received):
                        break
                    await asyncio.sleep(0.05)
                await stopped(task, ws)
                return [(a, kw) for a, kw in cp.received if a == "RemoteStopTransaction"] + [
                    ("started", {"transaction_id": started.transaction_id})
                ]

        got = await aio(charger)()
    assert got == [
        ("RemoteStopTransaction", {"transaction_id": got[-1][1]["transaction_id"]}),
        ("started", {"transaction_id": got[-1][1]["transaction_id"]}),
    ]
    (sid,) = rig.session_docs()
    assert rig.sessions.session_json(sid)["state"] == "completed"


async def test_an_ocpp_port_in_use_is_one_oserror_naming_it():
    """`meshnode run` reports start-up OSErrors in one line: serve_ocpp must raise one
    (not trio's exception group around it), saying which port."""
    import socket
    from types import SimpleNamespace

    from meshnode.ocpp import serve_ocpp

    rig = Rig()
    node = SimpleNamespace(
        sessions=rig.sessions, site_config=rig.site_config, wall_clock=lambda: rig.clock, change_listeners=[]
    )
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with trio_asyncio.open_loop():
            with pytest.raises(OSError, match=rf"cannot serve OCPP on {HOST}:{port}: ") as raised:
                with trio.fail_after(10):  # (were it serving, it would serve until cancelled)
                    await serve_ocpp(node, HOST, port)
    assert not isinstance(raised.value, BaseExceptionGroup)
    assert node.change_listeners == [] and node.ocpp is None
