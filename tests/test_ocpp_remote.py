"""Remote start and stop of a charger wherever in the mesh it is connected.

- The routing decision (`CommandRouting`, sans-IO): who is asked, in which waves,
  and what the answers mean; and the wire messages' bad-input checks.
- End to end with real processes: two nodes; a 2.0.1 station and a 1.6 charge point
  connected to node 1; `POST /v1/chargers/{id}/start` and
  `POST /v1/sessions/{id}/stop` on node 2's API reach them through node 1 over the
  mesh (`/m/ocpp/command`), the chargers start and stop real transactions, and
  the sessions show on both nodes. A charger connected nowhere gets 404, a stop
  of a finished session 409, and bad bodies 400.
- `POST /v1/chargers/{id}/network-profile` on node 2 gives a 2.0.1 station node 2's
  URL (SetNetworkProfile through node 1); when node 1 is SIGKILLed the station goes
  there and its transaction ends there. A 1.6 charger gets 409 (no profiles in 1.6).
- On an enrolled site the forwarded command travels sealed; an unsealed one from
  outside the site is refused (4.01) before any handler runs.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from meshnode._chargepoints import SimChargePoint, running
from meshnode.ocpp._remote import Command, CommandError, CommandReply, CommandRequest, CommandRouting

from .ocpp_helpers import OcppNode, eventually, in_thread, start_nodes, wait_peers

# --- the decision ------------------------------------------------------------------------


def _members(*ids: str) -> list[tuple[str, str]]:
    return [(i, f"{i}.host:5683") for i in ids]


def test_routing_asks_the_hint_first_then_everybody_else_at_once():
    r = CommandRouting.plan("me", _members("a", "b", "c", "me"), hint="c")
    assert r.next_wave() == [("c", "c.host:5683")]
    assert r.next_wave() == []  # c has not answered yet
    r.on_reply("c", CommandReply("absent", "c"))
    assert [n for n, _ in r.next_wave()] == ["a", "b"]
    r.on_reply("a", CommandReply("absent", "a"))
    assert r.next_wave() == []
    r.on_reply("b", CommandReply("accepted", "b", transaction_id="t1"))
    assert r.next_wave() == []
    assert r.outcome("me") == CommandReply("accepted", "b", transaction_id="t1")


def test_routing_outcomes_accepted_beats_rejected_beats_absent_and_silence_is_unreachable():
    r = CommandRouting.plan("me", _members("a", "b"))
    assert [n for n, _ in r.next_wave()] == ["a", "b"]  # no hint: one wave
    r.on_reply("a", CommandReply("rejected", "a"))
    r.on_reply("b", CommandReply("accepted", "b"))
    assert r.outcome("me").outcome == "accepted"

    r = CommandRouting.plan("me", _members("a", "b"), hint="gone")  # a hint that is no member
    assert len(r.next_wave()) == 2
    r.on_reply("a", CommandReply("absent", "a"))
    r.on_failure("b")
    assert r.outcome("me").outcome == "unreachable"

    r = CommandRouting.plan("me", _members("a"))
    r.next_wave()
    r.on_reply("a", CommandReply("absent", "a"))
    assert r.outcome("me").outcome == "absent"
    assert CommandRouting.plan("me", []).next_wave() == []
    assert CommandRouting.plan("me", []).outcome("me").outcome == "absent"


def test_routing_is_bounded():
    r = CommandRouting.plan("me", _members(*(f"n{i:03d}" for i in range(100))), max_targets=32)
    assert len(r.next_wave()) == 32 and r.next_wave() == []


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",
        b"\x80",  # a CBOR array, not a map
        CommandRequest("n1", Command("start", "cp")).encode(),  # no id token
        CommandRequest("n1", Command("stop", "cp")).encode(),  # no transaction id
        CommandRequest("n1", Command("start", "cp\n", id_token="t")).encode(),
        CommandRequest("n1", Command("start", "cp", id_token="t", evse=0)).encode(),
        CommandRequest("n1", Command("start", "x" * 200, id_token="t")).encode(),
        CommandRequest("n1", Command("profile", "cp", url="ws://n2:9000/ocpp/")).encode(),  # no slot
        CommandRequest("n1", Command("profile", "cp", slot=1, url="file:///etc/passwd")).encode(),
        CommandRequest("n1", Command("profile", "cp", slot=16, url="ws://n2:9000/ocpp/")).encode(),
        b"\xa1" + b"\x61a" + b"\x59\x10\x00" + b"0" * 4096,  # oversize
    ],
)
def test_a_bad_command_request_is_refused(payload):
    with pytest.raises(CommandError):
        CommandRequest.decode(payload)


def test_command_request_round_trip():
    for command in (
        Command("stop", "CP-1", transaction_id="abc", session_id="s1"),
        Command("start", "CP-1", id_token="T", evse=2),
        Command("profile", "CP-1", slot=1, url="wss://10.0.0.3:9000/ocpp/"),
    ):
        req = CommandRequest("n1", command)
        assert CommandRequest.decode(req.encode()) == req


# --- end to end ----------------------------------------------------------------------------


@pytest.fixture
def two(tmp_path):
    nodes = start_nodes(tmp_path, 2)
    try:
        wait_peers(nodes)
        yield nodes
    finally:
        for n in nodes:
            n.kill()


def _post(node: OcppNode, path: str, body: object) -> httpx.Response:
    return httpx.post(node.url + path, json=body, headers=node.headers, timeout=30.0)  # the token if enrolled


@pytest.mark.slow  # real node processes
def test_remote_start_and_stop_from_another_nodes_api(two: list[OcppNode]):
    n1, n2 = two

    async def scenario() -> None:
        st = SimChargePoint("CS-R201", [n1.ocpp_url], version="2.0.1")
        cp = SimChargePoint("CP-R16", [n1.ocpp_url], version="1.6")
        async with running(st, cp):
            for charger, evse in (("CS-R201", 2), ("CP-R16", 1)):
                r = await in_thread(
                    _post, n2, f"/v1/chargers/{charger}/start", {"id_token": f"RFID-{charger}", "evse": evse}
                )
                assert r.status_code == 202, r.text
                assert r.json()["outcome"] == "accepted" and r.json()["node"] == "n1"
            await st.settle()
            await cp.settle()
            assert [(t, e) for t, e, _ in st.remote_starts] == [("RFID-CS-R201", 2)]
            assert [(t, e) for t, e, _ in cp.remote_starts] == [("RFID-CP-R16", 1)]
            # The sessions replicate to node 2, whose API then stops them.
            await eventually(
                lambda: len(n2.sessions("CS-R201")) == 1 and len(n2.sessions("CP-R16")) == 1, what="replication"
            )
            [tx201] = st.transactions.values()
            [tx16] = cp.transactions.values()
            await st.meter(tx201, 400)
            await cp.meter(tx16, 250)
            for charger in ("CS-R201", "CP-R16"):
                [s] = await in_thread(n2.sessions, charger)
                r = await in_thread(_post, n2, f"/v1/sessions/{s['session_id']}/stop", {})
                assert r.status_code == 202, r.text
                assert (r.json()["outcome"], r.json()["node"]) == ("accepted", "n1")
            await st.settle()
            await cp.settle()
            assert tx201.stop_acked and tx16.stop_acked
            # Both stops replicate to both nodes (each travels on its own; under load
            # one may arrive a push later than the other).
            await eventually(
                lambda: all(n.sessions(c)[0]["state"] == "completed" for n in two for c in ("CS-R201", "CP-R16")),
                what="the stops to replicate",
            )
            # Stopping again: the charger refuses (no such running transaction) -> 409.
            [s] = await in_thread(n2.sessions, "CS-R201")
            r = await in_thread(_post, n2, f"/v1/sessions/{s['session_id']}/stop", {})
            assert r.status_code == 409, r.text

    asyncio.run(scenario())
    for node in two:
        [s201] = node.sessions("CS-R201")
        [s16] = node.sessions("CP-R16")
        assert (s201["connector"], s201["id_token"], s201["state"], s201["energy_wh"]) == (
            2,
            "RFID-CS-R201",
            "completed",
            400,
        )
        assert (s16["connector"], s16["id_token"], s16["state"], s16["energy_wh"]) == (
            1,
            "RFID-CP-R16",
            "completed",
            250,
        )


@pytest.mark.slow  # real node processes
def test_a_network_profile_sent_through_another_nodes_api_is_where_the_station_fails_over_to(two: list[OcppNode]):
    n1, n2 = two

    async def scenario() -> None:
        st = SimChargePoint("CS-NP", [n1.ocpp_url])
        cp = SimChargePoint("CP-NP16", [n1.ocpp_url], version="1.6")
        async with running(st, cp):
            body = {"slot": 1, "url": n2.ocpp_url + "/"}
            r = await in_thread(_post, n2, "/v1/chargers/CS-NP/network-profile", body)
            assert r.status_code == 202 and r.json()["node"] == "n1", r.text
            assert st.urls == [n1.ocpp_url, n2.ocpp_url]
            r = await in_thread(_post, n2, "/v1/chargers/CP-NP16/network-profile", body)
            assert r.status_code == 409 and "1.6" in r.json()["error"]  # 1.6 has no network profiles
            for bad in ({"slot": 1, "url": "http://x/"}, {"slot": 99, "url": body["url"]}, {"url": body["url"]}):
                assert (await in_thread(_post, n2, "/v1/chargers/CS-NP/network-profile", bad)).status_code == 400
            tx = await st.start("RFID-NP", 100)
            await st.meter(tx, 150)
            await eventually(
                lambda: [e["meter_wh"] for e in n2.sessions("CS-NP")[0]["events"]][-1:] == [150], what="replication"
            )
            n1.kill()
            async with asyncio.timeout(30):
                while st.connected_url != n2.ocpp_url:
                    await asyncio.sleep(0.05)
            await st.meter(tx, 250)
            await st.stop(tx, 400)
            await st.settle()
            assert tx.stop_acked and st.errors == []

    asyncio.run(scenario())
    [s] = n2.sessions("CS-NP")
    assert (s["state"], s["energy_wh"], [e["device_id"] for e in s["events"]]) == (
        "completed", 300, ["n1", "n1", "n1", "n2", "n2"],
    )  # fmt: skip


@pytest.mark.slow  # real node processes
def test_remote_commands_that_cannot_be_carried_out(two: list[OcppNode]):
    n1, n2 = two
    r = _post(n2, "/v1/chargers/CP-NOWHERE/start", {"id_token": "RFID-1"})
    assert r.status_code == 404 and r.json()["outcome"] == "absent"
    assert _post(n2, "/v1/sessions/no-such-session/stop", {}).status_code == 404
    for body in ({}, {"id_token": ""}, {"id_token": "x", "evse": "one"}, {"id_token": "x", "evse": 0}, [1]):
        assert _post(n2, "/v1/chargers/CP-1/start", body).status_code == 400, body
    r = httpx.post(n2.url + "/v1/chargers/CP-1/start", content=b"{not json", timeout=10)
    assert r.status_code == 400
    # A session started through the JSON API has no charger transaction to stop remotely.
    made = n1.post("/v1/sessions", {"charger": "api-cp", "connector": 1, "id_token": "RFID-9", "meter_wh": 0})
    assert made.status_code == 201
    assert _post(n1, f"/v1/sessions/{made.json()['session_id']}/stop", {}).status_code == 409
    # Both nodes keep serving, and a bad mesh request changed nothing.
    assert n1.get("/v1/status")["node_id"] == "n1" and n2.get("/v1/status")["node_id"] == "n2"


@pytest.mark.slow  # real node processes
def test_on_an_enrolled_site_remote_commands_travel_sealed_and_unsealed_ones_are_refused(tmp_path):
    """Both nodes enrolled: the forwarded start is sealed (and works); a plain CoAP
    request to /m/ocpp/command from outside the site is refused and reaches no charger."""
    import time

    import trio
    import trio_asyncio

    from meshnode._coap import open_coap_transport
    from meshnode._security import create_site, enroll
    from meshnode._transport import RemoteRefused
    from meshnode.services.chargers import charger_entry

    from .ocpp_helpers import HOSTS
    from .procs import free_port

    site_dir = tmp_path / "site"
    site = create_site(site_dir, "field", now=time.time())
    nodes = [OcppNode(f"n{i + 1}", HOSTS[3 + i], tmp_path / f"n{i + 1}", insecure=False) for i in range(2)]
    for n in nodes:
        enroll(site_dir, n.name, n.data_dir, now=time.time())
        n.peers = [m.coap for m in nodes if m is not n]
    try:
        for n in nodes:
            n.start()
        wait_peers(nodes)
        n1, n2 = nodes
        entry = charger_entry(site, "CS-SEALED", "pw-sealed-0123456789", time.time())
        assert n1.post("/v1/site/entries", {"entry": entry.hex()}).status_code == 201

        async def scenario() -> None:
            st = SimChargePoint("CS-SEALED", [n1.ocpp_url], password="pw-sealed-0123456789")
            async with running(st):
                r = await in_thread(_post, n2, "/v1/chargers/CS-SEALED/start", {"id_token": "RFID-S"})
                assert r.status_code == 202 and r.json()["node"] == "n1", r.text
                await st.settle()
                assert len(st.remote_starts) == 1

                async def unsealed() -> str:
                    bind = "127.0.14.30"
                    async with trio_asyncio.open_loop(), open_coap_transport(bind, free_port(bind)) as transport:
                        forged = CommandRequest("n2", Command("start", "CS-SEALED", id_token="RFID-X")).encode()
                        try:
                            await transport.request(n1.coap, "/m/ocpp/command", forged, timeout=5.0)
                        except RemoteRefused as exc:
                            return exc.code
                        return "answered"

                assert await asyncio.to_thread(trio.run, unsealed) == "4.01"  # refused before any handler
                assert len(st.remote_starts) == 1  # the forged start reached no charger

        asyncio.run(scenario())
        [s] = n1.sessions("CS-SEALED")
        assert s["id_token"] == "RFID-S"
    finally:
        for n in nodes:
            n.kill()
