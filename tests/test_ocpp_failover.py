"""Charger failover: a charger's node is SIGKILLed mid-transaction; the charger goes on at another node.

Real processes: two `meshnode run` nodes with OCPP on, both with an uplink to a real
`meshnode cloud`; a 2.0.1 station and a 1.6 charge point (the `ocpp` library's)
given both nodes' URLs (several CSMS URLs, tried in order; docs/ocpp.md). Each
starts a transaction on node 1 and meters there; once node 2 holds the replicated
session, node 1 is SIGKILLed. The chargers reconnect to node 2 (a reading taken
while no node answered is queued and replayed), meter and stop there: node 2
finds the transaction in the replicated session document (2.0.1 by the station's
transaction id, 1.6 by the integer id node 1 derived) and appends to the same
session. The cloud bills each session exactly once, for Ended/Stop - Started/Start.
Node 1 then restarts on its data and converges on the same documents: still one
bill each.

And the case where node 1 dies before the session left it: node 2 acknowledges and holds
a 1.6 charger's readings and stop until node 1 returns and the document arrives (the
node's change hook), then records them once, in order (bridge rule 6).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from meshnode._chargepoints import SimChargePoint, running

from .ocpp_helpers import HOSTS, OcppNode, eventually, start_nodes, wait_peers
from .procs import free_port, wait_until
from .test_e2e_uplink import CloudProcess, receipts_issued

pytestmark = pytest.mark.slow  # real node and cloud processes


@pytest.fixture
def rig(tmp_path):
    host = "127.0.14.9"
    cloud = CloudProcess(
        host, free_port(host), f"sqlite:///{tmp_path}/cloud.db", tmp_path / "cloud.key", tmp_path / "cloud.log",
        extra=["--log-level", "info"],
    )  # fmt: skip
    cloud.start()
    nodes: list[OcppNode] = []
    try:
        nodes = start_nodes(tmp_path, 2, extra=["--cloud-url", cloud.url, "--probe-interval", "1"])
        wait_peers(nodes)
        yield cloud, nodes
    finally:
        for n in nodes:
            n.kill()
        cloud.kill()


def test_open_transactions_fail_over_to_another_node_and_are_billed_once(rig):
    cloud, (n1, n2) = rig
    urls = [n1.ocpp_url, n2.ocpp_url]

    async def scenario() -> dict[str, tuple[int, int]]:
        st = SimChargePoint("CS-FO-201", list(urls), version="2.0.1")
        cp = SimChargePoint("CP-FO-16", list(urls), version="1.6")
        async with running(st, cp):
            assert st.connected_url == cp.connected_url == n1.ocpp_url
            tx_a = await st.start("RFID-FO-1", 10_000, evse=1)
            tx_b = await cp.start("RFID-FO-2", 70_000, evse=1)
            await st.meter(tx_a, 10_300)
            await cp.meter(tx_b, 70_100)
            assert tx_a.started_acked and tx_b.started_acked and not st.queue and not cp.queue

            def replicated() -> bool:
                got = {s["charger"]: s for s in n2.sessions()}
                return {"CS-FO-201", "CP-FO-16"} <= set(got) and all(
                    got[c]["events"][-1]["meter_wh"] == m for c, m in (("CS-FO-201", 10_300), ("CP-FO-16", 70_100))
                )

            await eventually(replicated, what="node 2 to hold both open sessions")
            n1.kill()  # SIGKILL: the chargers' sockets break
            await st.meter(tx_a, 10_800)  # to node 2, or queued until the charger is there
            await cp.meter(tx_b, 70_400)
            await st.wait_connected()
            await cp.wait_connected()
            assert st.connected_url == cp.connected_url == n2.ocpp_url
            await st.meter(tx_a, 11_100)
            await cp.meter(tx_b, 70_900)
            await st.stop(tx_a, 11_500)
            await cp.stop(tx_b, 71_000)
            await st.settle()
            await cp.settle()
            assert tx_a.stop_acked and tx_b.stop_acked
        return {"CS-FO-201": (10_000, 11_500), "CP-FO-16": (70_000, 71_000)}

    metered = asyncio.run(scenario())

    sessions = {s["charger"]: s for s in n2.sessions()}
    assert sorted(sessions) == ["CP-FO-16", "CS-FO-201"]  # one session each: no second start on node 2
    for charger, (start, stop) in metered.items():
        s = sessions[charger]
        assert s["energy_wh"] == stop - start and s["state"] in ("completed", "reconciled"), s
        writers = Counter(e["device_id"] for e in s["events"])
        assert writers["n1"] >= 3 and writers["n2"] >= 3, writers  # started on node 1, ended on node 2
        assert [e["type"] for e in s["events"]][-1] == "stop"
    ids = {s["session_id"] for s in sessions.values()}

    def billed() -> bool:
        ledger = cloud.ledger()
        return ids <= set(ledger) and all(ledger[i]["state"] == "reconciled" for i in ids)

    wait_until(billed, 90, what="both sessions reconciled in the ledger")
    # Node 1 comes back on its data and converges; nothing is billed again.
    n1.start()
    wait_until(
        lambda: (
            {s["session_id"]: s["state"] for s in n1.sessions() if s["session_id"] in ids}
            == dict.fromkeys(ids, "reconciled")
        ),
        90,
        what="node 1 to learn the receipts",
    )
    ledger = cloud.ledger()
    assert len(ledger) == 2
    for charger, (start, stop) in metered.items():
        row = ledger[sessions[charger]["session_id"]]
        assert (row["state"], row["energy_wh"]) == ("reconciled", stop - start)
    issued = receipts_issued(cloud)
    assert all(issued[i] == 1 for i in ids), issued


def test_a_16_stop_sent_while_its_session_was_only_on_the_dead_node_is_applied_when_it_returns(tmp_path):
    """Real processes, no cloud: node 1 accepts a 1.6 StartTransaction and is SIGKILLed
    before any other node holds the session (node 2 is not even running yet). The charger
    fails over to node 2 and meters and stops there: acknowledged and held. When node 1
    comes back on its data, the document replicates to node 2, which records the held
    reading and stop, once each and in order: the session is completed on node 2."""
    n1 = OcppNode("n1", HOSTS[0], tmp_path / "n1")
    n2 = OcppNode("n2", HOSTS[1], tmp_path / "n2")
    n1.peers, n2.peers = [n2.coap], [n1.coap]
    n1.start()
    try:

        async def scenario() -> None:
            cp = SimChargePoint("CP-HELD-16", [n1.ocpp_url, n2.ocpp_url], version="1.6")
            async with running(cp):
                assert cp.connected_url == n1.ocpp_url
                tx = await cp.start("RFID-HELD", 5_000, evse=1)
                assert tx.started_acked
                n1.kill()  # before node 2 ever saw the session
                await asyncio.to_thread(n2.start)
                await cp.wait_connected()
                assert cp.connected_url == n2.ocpp_url
                await cp.meter(tx, 5_400)
                await cp.stop(tx, 5_900)
                await cp.settle()
                assert tx.stop_acked and not cp.queue and cp.errors == []

        asyncio.run(scenario())
        assert n2.sessions() == []  # held, not recorded: node 2 has no session to record them in
        n1.start()

        def completed() -> bool:
            got = n2.sessions("CP-HELD-16")
            return len(got) == 1 and got[0]["state"] in ("completed", "reconciled")

        wait_until(completed, 60, what="node 2 to apply the held reading and stop")
        [s] = n2.sessions("CP-HELD-16")
        assert s["energy_wh"] == 900
        assert [(e["type"], e["device_id"], e["meter_wh"]) for e in s["events"]] == [
            ("authorize", "n1", None), ("start", "n1", 5_000), ("meter", "n2", 5_400), ("stop", "n2", 5_900),
        ]  # fmt: skip
    finally:
        n1.kill()
        n2.kill()
