"""OCPP 2.0.1 end to end: a real `meshnode run` process, the `ocpp` library's charging station.

1. A full session (Authorize, StatusNotification, TransactionEvent Started / Updated /
   Ended) shows in `GET /v1/sessions` with connector = EVSE id, id_token = idToken,
   energy = Ended - Started register, and the station and its EVSE state in /v1/status.
2. Offline replay: a station that lost its node queues its TransactionEvents
   (`offline: true`, their own timestamps) and sends them on reconnect; sent twice
   (answers lost), each still becomes exactly one event, in timestamp order; a
   transaction that ran entirely offline becomes one session.
3. A transaction started before authorisation (cable plugged in) becomes a session
   when the idToken arrives, with the Started register as its start; a free-vend
   station's NoAuthorization token is recorded; one never authorised makes none.
4. A session accepted offline with an energy limit is ended by the node, which sends
   the station RequestStopTransaction; the station's Ended then adds nothing.
5. Bad input: not JSON, unknown action, known but unhandled action, type, required
   field, enum, length, unprintable token and negative register violations get their
   CALLERROR, the connection stays, nothing is stored; an oversize frame closes the
   connection; the node keeps serving.

In-process (two central systems on one trio-asyncio loop, as two nodes):

6. RequestStart/RequestStopTransaction, GetLocalListVersion, SendLocalList and
   SetNetworkProfile reach a station; the profile the node gave is where the station
   goes when its node dies, and its transaction goes on there (one shared replica).
7. Failover before replication (two replicas): the new node refuses the station's
   Updated/Ended (InternalError) until the session document arrives; the station
   sends them again, and they are recorded once.

Plus the pure 2.0.1 meter parsing (units, multipliers, measurands, phases) and the
local list payload against the 2.0.1 schema.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

import pytest
import trio
import trio_asyncio
import websockets
from ocpp.charge_point import remove_nones, serialize_as_dict, snake_to_camel_case
from ocpp.messages import Call, _validate_payload
from ocpp.v201 import call as call201

from crdt import Replica, read_session
from meshnode._chargepoints import SimChargePoint, iso, running
from meshnode.ocpp import AuthStatus, OcppServer
from meshnode.ocpp._v201 import V201Commands, local_list_payload, readings_of

from .ocpp_helpers import OcppNode, in_thread, start_nodes
from .test_ocpp_bridge import Rig


@pytest.fixture
def node(tmp_path):
    [n] = start_nodes(tmp_path, 1, peered=False)
    yield n
    n.kill()


def _types(session):
    return [e["type"] for e in session["events"]]


@pytest.mark.slow  # real sockets (and a node process)
def test_a_201_session_shows_in_the_api_with_evse_token_and_energy(node: OcppNode):
    async def scenario():
        cp = SimChargePoint("CS-201-A", [node.ocpp_url])
        async with running(cp):
            await cp.status(2, "Occupied")
            auth = await cp.call(call201.Authorize(id_token={"id_token": "RFID-0A1", "type": "ISO14443"}))
            assert auth.id_token_info["status"] == "Accepted"
            tx = await cp.start("RFID-0A1", 10_000, evse=2)
            await cp.meter(tx, 10_400)
            await cp.meter(tx, 11_000)
            await cp.stop(tx, 11_250)
            assert not cp.queue and tx.stop_acked
            status = await in_thread(node.charger, "CS-201-A")
            assert status["connected"] is True and status["version"] == "ocpp2.0.1"
            assert status["connectors"]["2"]["status"] == "Occupied"
        return tx

    tx = asyncio.run(scenario())
    [s] = node.sessions("CS-201-A")
    assert (s["connector"], s["id_token"], s["state"], s["energy_wh"]) == (2, "RFID-0A1", "completed", 1250)
    assert _types(s) == ["authorize", "start", "meter", "meter", "stop"]
    assert [e["meter_wh"] for e in s["events"]][1:] == [10_000, 10_400, 11_000, 11_250]
    assert tx.tx_id  # the station's own id, kept by the bridge (found again by a remote stop)
    assert node.charger("CS-201-A")["connected"] is False


@pytest.mark.slow  # real sockets (and a node process)
def test_offline_replay_twice_is_exactly_once_in_timestamp_order(node: OcppNode):
    t0 = time.time()

    async def scenario():
        cp = SimChargePoint("CS-201-B", [node.ocpp_url])
        async with running(cp):
            tx = await cp.start("RFID-0B1", 500, ts=t0 - 900)
            await cp.meter(tx, 700, ts=t0 - 800)
            await cp.drop(stay_offline=True)
            await cp.meter(tx, 900, ts=t0 - 700)
            await cp.meter(tx, 1300, ts=t0 - 600)
            await cp.stop(tx, 1400, ts=t0 - 500)
            # A whole transaction while offline, on the other EVSE.
            tx2 = await cp.start("RFID-0B2", 50, evse=2, ts=t0 - 450)
            await cp.meter(tx2, 80, ts=t0 - 400)
            await cp.stop(tx2, 120, ts=t0 - 350)
            queued = [q.payload for q in cp.queue]
            assert len(queued) == 6 and all(p.offline for p in queued)
            assert await in_thread(node.sessions, "CS-201-B") and len(node.sessions("CS-201-B")) == 1
            cp.resume()
            await cp.wait_connected()
            await cp.settle()
            # The answers were lost, say: the station sends the same messages again.
            for p in queued:
                await cp.call(p)
        return tx, tx2

    asyncio.run(scenario())
    sessions = sorted(node.sessions("CS-201-B"), key=lambda s: s["started_ts"])
    assert len(sessions) == 2
    first, second = sessions
    assert _types(first) == ["authorize", "start", "meter", "meter", "meter", "stop"]
    assert [e["meter_wh"] for e in first["events"]][1:] == [500, 700, 900, 1300, 1400]
    ms = int(t0 * 1000)
    # The station's own timestamps (ms precision of its ISO strings), in order.
    assert [round((e["ts"] - ms) / 1000) for e in first["events"][1:]] == [-900, -800, -700, -600, -500]
    assert (first["state"], first["energy_wh"]) == ("completed", 900)
    assert _types(second) == ["authorize", "start", "meter", "stop"]
    assert (second["connector"], second["id_token"], second["energy_wh"], second["state"]) == (
        2, "RFID-0B2", 70, "completed",
    )  # fmt: skip


@pytest.mark.slow  # real sockets (and a node process)
def test_a_transaction_started_on_plug_in_becomes_a_session_when_authorised(node: OcppNode):
    async def scenario():
        cp = SimChargePoint("CS-201-C", [node.ocpp_url])
        async with running(cp):
            ref = "tx-plugged-1"
            common = {"transaction_info": {"transaction_id": ref}}

            def mv(wh):
                return [{"timestamp": iso(), "sampled_value": [{"value": wh}]}]

            await cp.call(call201.TransactionEvent(
                event_type="Started", timestamp=iso(), trigger_reason="CablePluggedIn", seq_no=0,
                evse={"id": 1, "connector_id": 1}, meter_value=mv(3000), **common,
            ))  # fmt: skip
            assert await in_thread(node.sessions, "CS-201-C") == []
            answer = await cp.call(call201.TransactionEvent(
                event_type="Updated", timestamp=iso(), trigger_reason="Authorized", seq_no=1,
                id_token={"id_token": "RFID-0C1", "type": "ISO14443"}, meter_value=mv(3010), **common,
            ))  # fmt: skip
            assert answer.id_token_info["status"] == "Accepted"
            await cp.call(call201.TransactionEvent(
                event_type="Ended", timestamp=iso(), trigger_reason="EVDeparted", seq_no=2,
                meter_value=mv(3500), **{"transaction_info": {"transaction_id": ref, "stopped_reason": "EVDisconnected"}},
            ))  # fmt: skip
            # A free-vend station (no authorisation) records its session under the type's name.
            await cp.call(call201.TransactionEvent(
                event_type="Started", timestamp=iso(), trigger_reason="CablePluggedIn", seq_no=5,
                evse={"id": 2}, transaction_info={"transaction_id": "tx-free"}, meter_value=mv(40),
                id_token={"id_token": "", "type": "NoAuthorization"},
            ))  # fmt: skip
            await cp.call(call201.TransactionEvent(
                event_type="Ended", timestamp=iso(), trigger_reason="EVDeparted", seq_no=6,
                transaction_info={"transaction_id": "tx-free"}, meter_value=mv(90),
            ))  # fmt: skip
            # Plugged in and out, never authorised: no session.
            await cp.call(call201.TransactionEvent(
                event_type="Started", timestamp=iso(), trigger_reason="CablePluggedIn", seq_no=3,
                evse={"id": 2}, transaction_info={"transaction_id": "tx-never"}, meter_value=mv(10),
            ))  # fmt: skip
            await cp.call(call201.TransactionEvent(
                event_type="Ended", timestamp=iso(), trigger_reason="EVDeparted", seq_no=4,
                transaction_info={"transaction_id": "tx-never"}, meter_value=mv(12),
            ))  # fmt: skip

    asyncio.run(scenario())
    s, free = sorted(node.sessions("CS-201-C"), key=lambda x: x["connector"])
    assert (s["id_token"], s["connector"], s["state"], s["energy_wh"]) == ("RFID-0C1", 1, "completed", 500)
    assert _types(s) == ["authorize", "start", "meter", "stop"]
    assert (free["id_token"], free["connector"], free["state"], free["energy_wh"]) == (
        "NoAuthorization", 2, "completed", 50,
    )  # fmt: skip


@pytest.mark.slow  # real sockets (and a node process)
def test_a_session_at_its_offline_limit_is_stopped_at_the_station(tmp_path):
    [node] = start_nodes(tmp_path, 1, peered=False, extra=["--unknown-token-max-wh", "500"])
    try:

        async def scenario():
            cp = SimChargePoint("CS-201-L", [node.ocpp_url])
            async with running(cp):
                tx = await cp.start("RFID-0L1", 2_000)
                await cp.meter(tx, 2_300)
                await cp.meter(tx, 2_600)  # 600 Wh: over the limit; the node ends the session
                async with asyncio.timeout(20):  # and sends RequestStopTransaction; the station ends
                    while not tx.stop_acked:
                        await asyncio.sleep(0.05)
                assert tx.ended and tx.stop_acked and cp.remote_stops == [tx.tx_id]
                return tx

        asyncio.run(scenario())
        [s] = node.sessions("CS-201-L")
        assert (s["state"], s["energy_wh"]) == ("completed", 600)
        assert _types(s) == ["authorize", "start", "meter", "meter", "stop"]  # the station's Ended added nothing
    finally:
        node.kill()


async def _raw(url: str, frames: list[str | bytes]) -> list[object]:
    """Send frames on a bare 2.0.1 connection; the answer to each (or the close code)."""
    out: list[object] = []
    async with websockets.connect(url, subprotocols=["ocpp2.0.1"]) as ws:
        for frame in frames:
            await ws.send(frame)
            try:
                async with asyncio.timeout(10):
                    out.append(json.loads(await ws.recv()))
            except websockets.exceptions.ConnectionClosed as exc:
                out.append(("closed", exc.rcvd.code if exc.rcvd else None))
                break
    return out


@pytest.mark.slow  # real sockets (and a node process)
def test_bad_input_gets_its_callerror_and_nothing_is_stored(node: OcppNode):
    url = node.ocpp_url + "/CS-201-BAD"
    good_tx = {
        "eventType": "Started", "timestamp": iso(), "triggerReason": "Authorized", "seqNo": 0,
        "transactionInfo": {"transactionId": "tx-bad"}, "idToken": {"idToken": "RFID-BAD", "type": "ISO14443"},
        "evse": {"id": 1}, "meterValue": [{"timestamp": iso(), "sampledValue": [{"value": 1}]}],
    }  # fmt: skip
    missing = {k: v for k, v in good_tx.items() if k != "seqNo"}
    frames = [
        "this is not json",
        json.dumps([2, "m1", "NoSuchAction", {}]),
        json.dumps([2, "m2", "ReservationStatusUpdate", {"reservationId": 1, "reservationUpdateStatus": "Expired"}]),
        json.dumps([2, "m3", "TransactionEvent", {**good_tx, "seqNo": "zero"}]),
        json.dumps([2, "m4", "TransactionEvent", missing]),
        json.dumps([2, "m5", "TransactionEvent", {**good_tx, "unexpected": 1}]),
        json.dumps([2, "m6", "TransactionEvent", {**good_tx, "eventType": "Paused"}]),
        json.dumps([2, "m7", "TransactionEvent", {**good_tx, "transactionInfo": {"transactionId": "x" * 37}}]),
        json.dumps([2, "m8a", "TransactionEvent", {**good_tx, "idToken": {"idToken": "RF\nID", "type": "ISO14443"}}]),
        json.dumps(
            [
                2,
                "m8b",
                "TransactionEvent",
                {**good_tx, "meterValue": [{"timestamp": iso(), "sampledValue": [{"value": -5}]}]},
            ]
        ),
        json.dumps([2, "m8c", "Authorize", {"idToken": {"idToken": "RF\u0007", "type": "ISO14443"}}]),
        json.dumps([2, "m8", "Heartbeat", {}]),
    ]
    answers = asyncio.run(_raw(url, frames))
    codes = [a[2] if a[0] == 4 else ("result" if a[0] == 3 else a) for a in answers]  # type: ignore[index]
    assert answers[0][1] == "-1"  # type: ignore[index]
    assert codes == [
        "FormatViolation",
        "NotImplemented",
        "NotSupported",
        "TypeConstraintViolation",
        "OccurrenceConstraintViolation",
        "FormatViolation",
        "PropertyConstraintViolation",
        "TypeConstraintViolation",
        "PropertyConstraintViolation",  # an unprintable idToken (it would be stored)
        "PropertyConstraintViolation",  # a negative energy register
        "PropertyConstraintViolation",
        "result",
    ], answers
    # Oversize: the connection is closed (1009), the node keeps serving.
    [closed] = asyncio.run(_raw(url, [json.dumps([2, "big", "Heartbeat", {"pad": "x" * 70_000}])]))
    assert closed == ("closed", 1009)
    [ok] = asyncio.run(_raw(url, [json.dumps([2, "m9", "Heartbeat", {}])]))
    assert ok[0] == 3  # type: ignore[index]
    assert node.sessions() == []


@pytest.mark.parametrize(
    ("sample", "wh"),
    [
        ({"value": 1234}, 1234),
        ({"value": 1.5, "unitOfMeasure": {"unit": "kWh"}}, 1500),
        ({"value": 12, "unitOfMeasure": {"unit": "Wh", "multiplier": 3}}, 12_000),
        ({"value": 7, "measurand": "Power.Active.Import"}, None),
        ({"value": 7, "phase": "L1"}, None),
        ({"value": 7, "unitOfMeasure": {"unit": "varh"}}, None),
        ({"value": -1, "measurand": "Power.Active.Import"}, None),
    ],
)
def test_201_energy_register_parsing(sample, wh):
    from ocpp.charge_point import camel_to_snake_case

    [r] = readings_of(camel_to_snake_case([{"timestamp": "2026-11-27T21:00:00Z", "sampledValue": [sample]}]))
    assert r.energy_wh == wh
    assert r.ts_ms == 1795813200000


@pytest.mark.parametrize(
    "sample", [{"value": -1}, {"value": 1e16}, {"value": -0.002, "unitOfMeasure": {"unit": "kWh"}}]
)
def test_201_a_register_out_of_range_is_a_property_constraint_violation(sample):
    from ocpp.charge_point import camel_to_snake_case
    from ocpp.exceptions import PropertyConstraintViolationError

    with pytest.raises(PropertyConstraintViolationError):
        readings_of(camel_to_snake_case([{"timestamp": "2026-11-27T21:00:00Z", "sampledValue": [sample]}]))


# --- the node's commands to a station, in-process over real WebSockets --------------------


@asynccontextmanager
async def two_servers(rig_a, rig_b):
    """Two central systems (as two nodes would run them) on one trio-asyncio loop."""
    async with trio_asyncio.open_loop(), trio.open_nursery() as outer:
        scopes = []
        bases = []
        for rig in (rig_a, rig_b):
            server = OcppServer(rig.bridge, rig.site_config)
            scope = trio.CancelScope()

            async def run(server=server, scope=scope, task_status=trio.TASK_STATUS_IGNORED):
                with scope:
                    await server.serve("127.0.14.20", 0, task_status=task_status)

            host, port = await outer.start(run)
            scopes.append((server, scope))
            bases.append(f"ws://{host}:{port}/ocpp")
        yield scopes, bases
        outer.cancel_scope.cancel()


@pytest.mark.slow  # real sockets (and a node process)
async def test_node_commands_and_failover_through_a_network_profile():
    """RequestStart/Stop, GetLocalListVersion, SendLocalList, SetNetworkProfile reach a
    station; the profile the node gave it is where it goes when its node dies, and its
    open transaction goes on there (both nodes hold the session document)."""
    replica = Replica()
    rig_a, rig_b = Rig(replica=replica, node_id="n1"), Rig(replica=replica, node_id="n2")
    async with two_servers(rig_a, rig_b) as ([(server_a, scope_a), (server_b, _)], [base_a, base_b]):
        cp = SimChargePoint("CS-CMD", [base_a])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio_asyncio.aio_as_trio(cp.serve))
            await trio_asyncio.aio_as_trio(cp.wait_connected)()
            commands = V201Commands(server_a)
            status, _ = await commands.request_start("CS-CMD", "RFID-CMD", 2, remote_id=77)
            assert status == "Accepted" and cp.remote_starts == [("RFID-CMD", 2, 77)]
            await trio_asyncio.aio_as_trio(cp.settle)()
            [tx] = cp.transactions.values()
            assert tx.started_acked and tx.remote_start_id == 77
            assert await commands.request_stop("CS-CMD", "no-such-tx") == "Rejected"
            assert await commands.get_local_list_version("CS-CMD") == 0
            assert await commands.send_local_list("CS-CMD") == "Accepted"
            assert await commands.set_network_profile("CS-CMD", 1, base_b + "/CS-CMD") == "Accepted"
            assert cp.urls == [base_a, base_b]
            await trio_asyncio.aio_as_trio(cp.meter)(tx, 300)
            scope_a.cancel()  # node 1 dies: the station goes to its other profile
            with trio.fail_after(20):
                while cp.connected_url != base_b:
                    await trio.sleep(0.05)
            await trio_asyncio.aio_as_trio(cp.meter)(tx, 700)
            status = await V201Commands(server_b).request_stop("CS-CMD", tx.tx_id)
            assert status == "Accepted"
            await trio_asyncio.aio_as_trio(cp.settle)()
            assert tx.stop_acked and cp.remote_stops == ["no-such-tx", tx.tx_id]
            nursery.cancel_scope.cancel()
    [sid] = rig_a.session_docs()
    events = rig_a.events(sid)
    assert [(e["type"], e["device_id"], e["meter_wh"]) for e in events] == [
        ("authorize", "n1", None), ("start", "n1", 0), ("meter", "n1", 300), ("meter", "n2", 700), ("stop", "n2", 700),
    ]  # fmt: skip
    assert read_session(replica.docs[sid]).connector == 2


def test_the_local_list_payload_is_valid_2_0_1():
    payload = call201.SendLocalList(
        **local_list_payload(7, [("RFID-1", AuthStatus.ACCEPTED), ("RFID-2", AuthStatus.BLOCKED)])
    )
    msg = Call("1", "SendLocalList", remove_nones(snake_to_camel_case(serialize_as_dict(payload))))
    _validate_payload(msg, "2.0.1")
    assert msg.payload["localAuthorizationList"][1] == {
        "idToken": {"idToken": "RFID-2", "type": "Central"}, "idTokenInfo": {"status": "Blocked"},
    }  # fmt: skip
    empty = Call("2", "SendLocalList", snake_to_camel_case(local_list_payload(0, [])))
    _validate_payload(empty, "2.0.1")  # (an empty list must be left out: minItems 1)


@pytest.mark.slow  # real sockets (and a node process)
async def test_a_reading_for_a_transaction_still_replicating_is_refused_until_its_start_arrives():
    """Failover before replication: node 2 does not know the transaction yet; it refuses
    the station's Updated/Ended (InternalError), the station sends them again (2.0.1
    E04), and once the session document arrives they are recorded, once each."""
    rig_a, rig_b = Rig(node_id="n1"), Rig(node_id="n2")  # two replicas: nothing replicates by itself
    async with two_servers(rig_a, rig_b) as ([(_, scope_a), _], [base_a, base_b]):
        cp = SimChargePoint("CS-LATE", [base_a, base_b])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio_asyncio.aio_as_trio(cp.serve))
            await trio_asyncio.aio_as_trio(cp.wait_connected)()
            tx = await trio_asyncio.aio_as_trio(cp.start)("RFID-LATE", 1000)
            assert tx.started_acked
            scope_a.cancel()  # node 1 dies before its document reached node 2
            with trio.fail_after(20):
                while cp.connected_url != base_b:
                    await trio.sleep(0.05)
            done = trio.Event()

            async def station() -> None:
                await trio_asyncio.aio_as_trio(cp.meter)(tx, 1300)
                await trio_asyncio.aio_as_trio(cp.stop)(tx, 1600)
                done.set()

            nursery.start_soon(station)
            with trio.fail_after(20):  # node 2 refuses the reading (it does not know the transaction)
                while cp.refusals < 2:
                    await trio.sleep(0.05)
            assert not done.is_set() and rig_b.session_docs() == []
            [sid] = rig_a.session_docs()
            rig_b.replica.docs[sid] = rig_a.replica.docs[sid].fork()  # the document arrives, as replication brings it
            with trio.fail_after(20):
                await done.wait()
            nursery.cancel_scope.cancel()
    assert cp.errors == [] and tx.stop_acked
    [sid] = rig_b.session_docs()
    assert [(e["type"], e["device_id"], e["meter_wh"]) for e in rig_b.events(sid)] == [
        ("authorize", "n1", None), ("start", "n1", 1000), ("meter", "n2", 1300), ("stop", "n2", 1600),
    ]  # fmt: skip
