"""OCPP 1.6J against real `meshnode run` processes, with the `ocpp` library's ChargePoint.

Each test starts node processes (tests/procs.py) with `--ocpp-port` on their own
loopback address (127.0.14.x) and drives a 1.6 charge point over a real WebSocket:

- a full session shows in `GET /v1/sessions` like any other, the charger and its
  connector states in `/v1/status` and `meshnode status`;
- offline replay: messages queued while the charger was away, sent again (twice) on
  reconnect with their old timestamps, and once more after the node restarted, become
  exactly one event each, at the charger's times;
- an enrolled site: a charger registered with `meshnode charger add` connects with its
  password; unregistered ids, wrong passwords, no credentials get 401 at the upgrade;
  the site's token lists reach the charger's local list;
- bad input over the real node: CALLERRORs, the connection stays, nothing stored.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint as V16ChargePoint
from ocpp.v16 import call, call_result
from ocpp.v16.enums import Action

from crdt import decode_event, read_session

from .procs import NodeProcess, free_port, wait_until

pytestmark = pytest.mark.slow  # real node processes

ROOT = Path(__file__).resolve().parent.parent


def iso(ms: float) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def arun(fn: Any) -> Any:
    """Run a charge point's asyncio code to completion from a (sync) test.

    On a trio-asyncio loop, not `asyncio.run`: once trio-asyncio is imported (the suite
    imports the node), it replaces `asyncio.get_running_loop`, and some callbacks of a
    plain asyncio loop (websockets' TLS `connection_made`) then find no loop.
    """

    async def main() -> Any:
        async with trio_asyncio.open_loop():
            return await trio_asyncio.aio_as_trio(fn)()

    return trio.run(main)


def now_ms() -> int:
    return int(time.time() * 1000)


def start_node(tmp_path: Path, name: str, host: str, *, insecure: bool = True, extra=()) -> NodeProcess:
    ocpp_port = free_port(host)
    node = NodeProcess(
        name, host, tmp_path / name, coap_port=free_port(host), http_port=free_port(host), insecure=insecure,
        extra=["--ocpp-port", str(ocpp_port), *extra],
    )  # fmt: skip
    node.ocpp_url = f"ws://{host}:{ocpp_port}/ocpp/"  # type: ignore[attr-defined]
    node.start()
    return node


class Charger(V16ChargePoint):
    """A 1.6 charge point that keeps the local list the node sends it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.local_list: dict[str, str] = {}
        self.local_list_version = 0

    @on(Action.get_local_list_version)
    def get_local_list_version(self) -> Any:
        return call_result.GetLocalListVersion(list_version=self.local_list_version)

    @on(Action.send_local_list)
    def send_local_list(self, list_version: int, update_type: str, local_authorization_list=()) -> Any:
        self.local_list = {e["id_tag"]: e["id_tag_info"]["status"] for e in local_authorization_list}
        self.local_list_version = list_version
        return call_result.SendLocalList(status="Accepted")


class Connected:
    """`async with Connected(url, id) as cp`: a running 1.6 charge point over a real websocket."""

    def __init__(self, url: str, charger_id: str, **connect: Any) -> None:
        self.url, self.charger_id, self.connect = url + charger_id, charger_id, connect

    async def __aenter__(self) -> Charger:
        self.ws = await websockets.connect(self.url, subprotocols=["ocpp1.6"], **self.connect)
        self.cp = Charger(self.charger_id, self.ws)
        self.task = asyncio.ensure_future(self.cp.start())
        return self.cp

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()
        self.task.cancel()
        try:  # it may have ended already: the node called while we closed
            await self.task
        except (asyncio.CancelledError, websockets.ConnectionClosed):
            pass


def sessions(node: NodeProcess) -> list[dict[str, Any]]:
    return node.get("/v1/sessions")["sessions"]


def events_with_data(node: NodeProcess, session_id: str) -> list[dict[str, Any]]:
    """A session's events with their data, read from the node's Automerge document."""
    import httpx
    from automerge.core import Document

    blob = httpx.get(f"{node.url}/v1/sessions/{session_id}/automerge", timeout=10).content
    data = read_session(Document.load(blob))
    return sorted((decode_event(b)[0] for b in data.events.values()), key=lambda e: (e["ts"], e["seq"]))


def test_a_full_session_over_ocpp16(tmp_path):
    node = start_node(tmp_path, "n1", "127.0.14.11")
    try:
        t0 = now_ms() - 30_000
        signed = {"value": "OCMF|{\"RD\":[{\"RV\":1.4}]}|{\"SD\":\"3045\"}", "format": "SignedData",
                  "context": "Sample.Periodic", "measurand": "Energy.Active.Import.Register"}  # fmt: skip

        async def run() -> int:
            async with Connected(node.ocpp_url, "CP-1") as cp:  # type: ignore[attr-defined]
                boot = await cp.call(call.BootNotification(charge_point_model="M1", charge_point_vendor="V"))
                assert boot.status == "Accepted" and boot.interval > 0
                await cp.call(call.StatusNotification(connector_id=2, error_code="NoError", status="Preparing"))
                assert (await cp.call(call.Authorize(id_tag="RFID-1"))).id_tag_info["status"] == "Accepted"
                started = await cp.call(
                    call.StartTransaction(connector_id=2, id_tag="RFID-1", meter_start=10_000, timestamp=iso(t0))
                )
                assert started.id_tag_info["status"] == "Accepted" and started.transaction_id > 0
                await cp.call(call.StatusNotification(connector_id=2, error_code="NoError", status="Charging"))
                await cp.call(
                    call.MeterValues(
                        connector_id=2,
                        transaction_id=started.transaction_id,
                        meter_value=[
                            {
                                "timestamp": iso(t0 + 10_000),
                                "sampledValue": [
                                    {"value": "11.4", "unit": "kWh"},
                                    {"value": "7200", "measurand": "Power.Active.Import"},
                                    signed,
                                ],
                            }
                        ],  # fmt: skip
                    )
                )
                assert (await cp.call(call.Heartbeat())).current_time
                data = await cp.call(call.DataTransfer(vendor_id="com.example", message_id="x", data="y"))
                assert data.status == "UnknownVendorId"
                stopped = await cp.call(
                    call.StopTransaction(
                        meter_stop=12_500,
                        timestamp=iso(t0 + 20_000),
                        transaction_id=started.transaction_id,
                        reason="EVDisconnected",
                        id_tag="RFID-1",
                        transaction_data=[
                            {"timestamp": iso(t0 + 15_000), "sampledValue": [{"value": "12000"}]},
                        ],
                    )
                )
                assert stopped.id_tag_info["status"] == "Accepted"
                await cp.call(call.StatusNotification(connector_id=2, error_code="NoError", status="Finishing"))
                status = node.get("/v1/status")["chargers"]
                assert [(c["charger_id"], c["connected"], c["connectors"]["2"]["status"]) for c in status] == [
                    ("CP-1", True, "Finishing")
                ]
                shown = await asyncio.to_thread(_cli, "status", "--http", node.url)
                assert "CP-1" in shown.stdout and "connected" in shown.stdout and "2:Finishing" in shown.stdout
                return started.transaction_id

        txid = arun(run)
        (session,) = sessions(node)
        assert (session["charger"], session["connector"], session["id_token"]) == ("CP-1", 2, "RFID-1")
        assert session["state"] == "completed" and session["energy_wh"] == 2500
        assert (session["started_ts"], session["stopped_ts"]) == (t0, t0 + 20_000)
        events = events_with_data(node, session["session_id"])
        assert [(e["type"], e["meter_wh"]) for e in events] == [
            ("authorize", None), ("start", 10_000), ("meter", 11_400), ("meter", 12_000), ("stop", 12_500)
        ]  # fmt: skip
        assert events[1]["data"]["ocpp"]["transaction_id"] == txid
        assert events[2]["data"]["ocpp"]["signed"] == [signed]
        assert events[4]["data"]["ocpp"]["reason"] == "EVDisconnected"
        wait_until(lambda: node.get("/v1/status")["chargers"][0]["connected"] is False, what="the disconnect")
        assert node.stop() == 0
    finally:
        node.kill()


def test_offline_replay_is_recorded_exactly_once_also_after_a_restart(tmp_path):
    node = start_node(tmp_path, "n1", "127.0.14.12")
    try:
        t0 = now_ms() - 15 * 60_000
        mv1 = {"timestamp": iso(t0 + 60_000), "sampledValue": [{"value": "1500"}]}
        mv2 = {"timestamp": iso(t0 + 120_000), "sampledValue": [{"value": "2100"}]}
        # The second session happened entirely while the node was away.
        t1 = t0 + 5 * 60_000
        start2 = call.StartTransaction(connector_id=1, id_tag="RFID-2", meter_start=2100, timestamp=iso(t1))

        async def online_start() -> int:
            async with Connected(node.ocpp_url, "CP-1") as cp:  # type: ignore[attr-defined]
                started = await cp.call(
                    call.StartTransaction(connector_id=1, id_tag="RFID-1", meter_start=1000, timestamp=iso(t0))
                )
                return started.transaction_id

        txid = arun(online_start)  # ... and then the charger loses its node

        async def replay() -> list[int]:
            txids = []
            async with Connected(node.ocpp_url, "CP-1") as cp:  # type: ignore[attr-defined]
                for _ in range(2):  # the answers were lost: the charger sends its queue again
                    await cp.call(call.MeterValues(connector_id=1, transaction_id=txid, meter_value=[mv1]))
                    await cp.call(
                        call.StopTransaction(
                            meter_stop=2100,
                            timestamp=iso(t0 + 180_000),
                            transaction_id=txid,
                            transaction_data=[mv1, mv2],
                        )
                    )
                    second = await cp.call(start2)
                    txids.append(second.transaction_id)
                    await cp.call(
                        call.StopTransaction(meter_stop=2600, timestamp=iso(t1 + 60_000), transaction_id=txids[-1])
                    )
            return txids

        first_txids = arun(replay)
        assert first_txids[0] == first_txids[1] != txid

        def check() -> None:
            by_tag = {s["id_token"]: s for s in sessions(node)}
            assert sorted(by_tag) == ["RFID-1", "RFID-2"]
            one, two = by_tag["RFID-1"], by_tag["RFID-2"]
            assert [(e["type"], e["meter_wh"], e["ts"]) for e in one["events"]] == [
                ("authorize", None, t0), ("start", 1000, t0), ("meter", 1500, t0 + 60_000),
                ("meter", 2100, t0 + 120_000), ("stop", 2100, t0 + 180_000),
            ]  # fmt: skip
            assert one["energy_wh"] == 1100 and one["state"] == "completed"
            assert [e["type"] for e in two["events"]] == ["authorize", "start", "stop"]
            assert (two["energy_wh"], two["started_ts"], two["stopped_ts"]) == (500, t1, t1 + 60_000)

        check()
        assert node.stop() == 0
        node.start()  # a restart: the transaction ids live in the documents

        async def after_restart() -> int:
            async with Connected(node.ocpp_url, "CP-1") as cp:  # type: ignore[attr-defined]
                await cp.call(call.StopTransaction(meter_stop=2100, timestamp=iso(t0 + 180_000), transaction_id=txid))
                again = await cp.call(start2)
                await cp.call(
                    call.StopTransaction(
                        meter_stop=2600, timestamp=iso(t1 + 60_000), transaction_id=again.transaction_id
                    )
                )
                return again.transaction_id

        assert arun(after_restart) == first_txids[0]
        check()

        async def stop_while_connected() -> int:
            async with Connected(node.ocpp_url, "CP-1") as cp:  # type: ignore[attr-defined]
                await cp.call(call.Heartbeat())
                return await asyncio.to_thread(node.stop)

        assert arun(stop_while_connected) == 0  # a connected charger does not hold the node up
    finally:
        node.kill()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshnode.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_an_enrolled_site_admits_registered_chargers_only(tmp_path):
    import base64

    from meshnode._security import create_site, enroll
    from uplink import load_or_create_cloud_key

    site_dir = tmp_path / "site"
    create_site(site_dir, "field", now=time.time())
    cloud_key_path = tmp_path / "cloud.key"
    cloud_key = load_or_create_cloud_key(cloud_key_path)
    (site_dir / "cloud.pub").write_bytes(bytes(cloud_key.verify_key))
    enroll(site_dir, "n1", tmp_path / "n1", now=time.time())
    node = start_node(tmp_path, "n1", "127.0.14.13", insecure=False, extra=["--unknown-token-policy", "refuse"])
    try:
        for bad in (["--site", str(tmp_path / "no-site")], ["--site", str(site_dir), "--id", "a/b"]):
            refused = _cli("charger", "add", "--id", "CP-X", *bad)
            assert refused.returncode == 1 and "password" not in refused.stdout, refused
        added = _cli(
            "charger",
            "add",
            "--site",
            str(site_dir),
            "--id",
            "CP-1",
            "--http",
            node.url,
            "--data-dir",
            str(tmp_path / "n1"),
        )
        assert added.returncode == 0, added.stderr
        password = added.stdout.splitlines()[0].removeprefix("password ")
        assert len(password) >= 20
        for tag, revoke in (("RFID-OK", False), ("RFID-GONE", True)):
            args = ["token", "list", "--cloud-key", str(cloud_key_path), "--token-id", tag, "--http", node.url,
                    "--data-dir", str(tmp_path / "n1")]  # fmt: skip
            assert _cli(*args, *(["--revoke"] if revoke else [])).returncode == 0

        def basic(user: str, pw: str) -> dict[str, Any]:
            token = base64.b64encode(f"{user}:{pw}".encode()).decode()
            return {"additional_headers": {"Authorization": f"Basic {token}"}}

        async def upgrade_status(charger_id: str, **connect: Any) -> int:
            try:
                async with websockets.connect(node.ocpp_url + charger_id, subprotocols=["ocpp1.6"], **connect):  # type: ignore[attr-defined]
                    return 101
            except websockets.InvalidStatus as exc:
                return exc.response.status_code

        async def run() -> Charger:
            assert await upgrade_status("CP-1") == 401  # no credentials
            assert await upgrade_status("CP-1", **basic("CP-1", password + "x")) == 401
            assert await upgrade_status("CP-2", **basic("CP-2", password)) == 401  # not registered
            assert await upgrade_status("CP-2", **basic("CP-1", password)) == 401  # user is not the path's id
            async with Connected(node.ocpp_url, "CP-1", **basic("CP-1", password)) as cp:  # type: ignore[attr-defined]
                boot = await cp.call(call.BootNotification(charge_point_model="M1", charge_point_vendor="V"))
                assert boot.status == "Accepted"
                for _ in range(100):  # the node sends the site's lists after the boot
                    if cp.local_list:
                        break
                    await asyncio.sleep(0.1)
                answers = [
                    (await cp.call(call.Authorize(id_tag=t))).id_tag_info["status"]
                    for t in ("RFID-OK", "RFID-GONE", "WHO")
                ]
                assert answers == ["Accepted", "Blocked", "Invalid"]
                return cp

        cp = arun(run)
        assert cp.local_list == {"RFID-OK": "Accepted", "RFID-GONE": "Blocked"} and cp.local_list_version > 0
        assert [c["charger_id"] for c in node.get("/v1/status")["chargers"]] == ["CP-1"]  # refused ones left no trace
        # Registering again replaces the password.
        again = _cli(
            "charger",
            "add",
            "--site",
            str(site_dir),
            "--id",
            "CP-1",
            "--http",
            node.url,
            "--data-dir",
            str(tmp_path / "n1"),
        )
        new_password = again.stdout.splitlines()[0].removeprefix("password ")
        assert arun(functools.partial(upgrade_status, "CP-1", **basic("CP-1", password))) == 401
        assert arun(functools.partial(upgrade_status, "CP-1", **basic("CP-1", new_password))) == 101
    finally:
        node.kill()


def test_bad_input_over_a_real_node_changes_nothing(tmp_path):
    node = start_node(tmp_path, "n1", "127.0.14.14")
    try:

        async def run() -> list[Any]:
            async with websockets.connect(node.ocpp_url + "CP-1", subprotocols=["ocpp1.6"]) as ws:  # type: ignore[attr-defined]
                out = []
                for frame in (
                    "{not json",
                    json.dumps([2, "a", "Teleport", {}]),
                    json.dumps([2, "b", "StartTransaction", {"connectorId": 1, "idTag": "T", "meterStart": -5}]),
                    json.dumps(
                        [
                            2,
                            "c",
                            "StartTransaction",
                            {"connectorId": 1, "idTag": "T", "meterStart": "lots", "timestamp": iso(now_ms())},
                        ]
                    ),  # fmt: skip
                    json.dumps([2, "d", "Heartbeat", {}]),
                ):
                    await ws.send(frame)
                    out.append(await answer(ws))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.send(json.dumps([2, "e", "DataTransfer", {"vendorId": "v", "data": "x" * 100_000}]))
                    while True:  # nothing but the node's own calls before the close
                        assert await answer(ws) is None
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
                return out

        node_calls: list[str] = []

        async def answer(ws: Any) -> Any:
            """The next answer to one of our frames; the node's own CALLs (after a Heartbeat it
            asks for the local list version, when it likes) are noted and not answered."""
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg[0] != 2:
                    return msg
                node_calls.append(msg[2])

        answers = arun(run)
        assert [a[:3] for a in answers[:4]] == [
            [4, "-1", "FormationViolation"], [4, "a", "NotImplemented"],
            [4, "b", "OccurenceConstraintViolation"], [4, "c", "TypeConstraintViolation"],
        ]  # fmt: skip
        assert answers[4][0] == 3
        assert set(node_calls) <= {"GetLocalListVersion"}, node_calls
        assert sessions(node) == []
        assert node.get("/v1/status")["documents"] == 0
    finally:
        node.kill()


TLS_DIR = ROOT / "tests" / "data" / "ocpp_tls"
"""A self-signed certificate for 127.0.14.15 valid 2020-2120 (made with `openssl ca -selfsign`
so that its validity starts in the past; `node.key` is its key, for these tests only)."""


def test_security_profile_2_tls_then_basic_auth(tmp_path):
    import base64
    import ssl

    from meshnode._security import create_site, enroll

    site_dir = tmp_path / "site"
    create_site(site_dir, "field", now=time.time())
    enroll(site_dir, "n1", tmp_path / "n1", now=time.time())
    certs = ["--ocpp-certfile", str(TLS_DIR / "node.crt"), "--ocpp-keyfile", str(TLS_DIR / "node.key")]
    node = start_node(tmp_path, "n1", "127.0.14.15", insecure=False, extra=certs)
    try:
        added = _cli(
            "charger",
            "add",
            "--site",
            str(site_dir),
            "--id",
            "CP-1",
            "--http",
            node.url,
            "--data-dir",
            str(tmp_path / "n1"),
        )
        password = added.stdout.splitlines()[0].removeprefix("password ")
        wss = node.ocpp_url.replace("ws://", "wss://")  # type: ignore[attr-defined]
        trust = ssl.create_default_context(cafile=str(TLS_DIR / "node.crt"))

        def basic(pw: str) -> dict[str, Any]:
            return {"Authorization": "Basic " + base64.b64encode(f"CP-1:{pw}".encode()).decode()}

        async def run() -> None:
            with pytest.raises((websockets.InvalidHandshake, OSError, asyncio.TimeoutError)):
                await asyncio.wait_for(  # plain ws to a TLS port: no OCPP
                    websockets.connect(
                        node.ocpp_url + "CP-1", subprotocols=["ocpp1.6"], additional_headers=basic(password)
                    ),  # type: ignore[attr-defined]
                    10,
                )
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(
                    wss + "CP-1", subprotocols=["ocpp1.6"], ssl=trust, additional_headers=basic("x")
                ):
                    pass
            assert refused.value.response.status_code == 401
            async with Connected(wss, "CP-1", ssl=trust, additional_headers=basic(password)) as cp:
                boot = await cp.call(call.BootNotification(charge_point_model="M1", charge_point_vendor="V"))
                assert boot.status == "Accepted"

        arun(run)
        assert node.get("/v1/status")["chargers"][0]["charger_id"] == "CP-1"
    finally:
        node.kill()


@pytest.mark.slow  # real sockets
async def test_a_16_stop_after_failover_before_replication_is_held_until_the_session_arrives():
    """In-process, two central systems as two nodes (two replicas, nothing replicates by
    itself): node 1 accepts a 1.6 StartTransaction and dies before its document left.
    The charger fails over to node 2 and meters and stops there: node 2 acknowledges
    (1.6 has no "later") and holds them; when the document arrives (the node's change
    hook), they are recorded in timestamp order, once each."""
    from meshnode._chargepoints import SimChargePoint

    from .test_ocpp201 import two_servers
    from .test_ocpp_bridge import Rig

    rig_a, rig_b = Rig(node_id="n1"), Rig(node_id="n2")
    async with two_servers(rig_a, rig_b) as ([(_, scope_a), _], [base_a, base_b]):
        cp = SimChargePoint("CP-LATE", [base_a, base_b], version="1.6")
        async with trio.open_nursery() as nursery:
            await nursery.start(rig_b.bridge.serve_held)
            nursery.start_soon(trio_asyncio.aio_as_trio(cp.serve))
            await trio_asyncio.aio_as_trio(cp.wait_connected)()
            tx = await trio_asyncio.aio_as_trio(cp.start)("TAG-LATE", 1000)
            assert tx.started_acked
            scope_a.cancel()  # node 1 dies before its document reached node 2
            with trio.fail_after(20):
                while cp.connected_url != base_b:
                    await trio.sleep(0.05)
            await trio_asyncio.aio_as_trio(cp.meter)(tx, 1300)
            await trio_asyncio.aio_as_trio(cp.stop)(tx, 1600)
            await trio_asyncio.aio_as_trio(cp.settle)()
            assert tx.stop_acked and cp.refusals == 0 and cp.errors == []  # acknowledged: the charger moves on
            assert rig_b.session_docs() == [] and len(rig_b.bridge.held) == 1
            [sid] = rig_a.session_docs()
            rig_b.replica.docs[sid] = rig_a.replica.docs[sid].fork()  # the document arrives, as replication brings it
            rig_b.bridge.document_changed(sid)  # what Node._changed tells its change listeners
            with trio.fail_after(20):
                while rig_b.bridge.held:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert [(e["type"], e["device_id"], e["meter_wh"]) for e in rig_b.events(sid)] == [
        ("authorize", "n1", None), ("start", "n1", 1000), ("meter", "n2", 1300), ("stop", "n2", 1600),
    ]  # fmt: skip
    assert rig_b.sessions.session_json(sid)["energy_wh"] == 600
