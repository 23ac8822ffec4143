"""`GET /metrics` on a node and on the cloud: prometheus_client exposition, per-app registries.

The node's numbers are read at scrape time from what it already keeps; these tests
drive a node and a cloud through their real APIs and check that the exposition moves
with them (parsed with prometheus_client's own parser, not with string matching).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from meshnode._api import build_app
from meshnode._discovery import StaticDiscovery
from meshnode._node import Node, NodeConfig
from meshnode._transport import MemoryNetwork
from uplink._cloud import open_cloud

from .test_cloud import CLOUD_KEY, Leader, completed
from .conftest import make_signer

NOW = 1_800_000_000.0


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("node_id", "site"))))] = s.value
    return out


async def test_node_metrics_follow_sessions_and_each_node_has_its_own_registry(tmp_path: Path, autojump_clock):
    net = MemoryNetwork()
    async with (
        trio.open_nursery() as nursery,
        net.transport("10.0.0.1:5683") as t1,
        net.transport("10.0.0.2:5683") as t2,
    ):
        nodes = []
        for name, transport in (("n1", t1), ("n2", t2)):
            node = Node(
                NodeConfig(node_id=name, data_dir=tmp_path / name, seed=7),
                transport=transport, discovery=StaticDiscovery([]), wall_clock=lambda: NOW + trio.current_time(),
            )  # fmt: skip
            await nursery.start(node.serve)
            nodes.append(node)
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(n)), base_url="http://node") for n in nodes
        ]
        async with clients[0] as one, clients[1] as two:
            first = await one.get("/metrics")
            assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
            before = samples(first.text)
            assert before[("meshnode_documents", ())] == 0
            assert before[("meshnode_connectivity_state", (("state", "OFFLINE"),))] == 1
            assert before[("meshnode_peers_alive", ())] == 0
            assert before[("meshnode_leader_changes_total", ())] == 0
            assert ("meshnode_reconcile_seconds_count", ()) in before
            created = await one.post("/v1/sessions", json={"charger": "c1", "connector": 1, "id_token": "T"})
            assert created.status_code == 201
            sid = created.json()["session_id"]
            await one.post(f"/v1/sessions/{sid}/events", json={"type": "meter", "meter_wh": 50})
            after = samples((await one.get("/metrics")).text)
            assert after[("meshnode_documents", ())] == 1
            assert after[("meshnode_sessions", (("state", "charging"),))] == 1
            # The other node's registry saw none of it.
            other = samples((await two.get("/metrics")).text)
            assert other[("meshnode_documents", ())] == 0
            assert ("meshnode_sessions", (("state", "charging"),)) not in other
        nursery.cancel_scope.cancel()


async def test_cloud_metrics_count_ingest_and_ledger_rows(tmp_path: Path):
    async with open_cloud(f"sqlite:///{tmp_path}/cloud.db", signing_key=CLOUD_KEY) as cloud:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cloud.app), base_url="http://cloud") as client:
            before = samples((await client.get("/metrics")).text)
            assert before[("meshnode_cloud_ledger_rows", ())] == 0
            assert before[("meshnode_cloud_sessions_ingested_total", ())] == 0
            assert before[("meshnode_cloud_ingest_seconds_count", ())] == 0
            assert before[("meshnode_cloud_database_up", ())] == 1
            signer = make_signer("node-a")
            leader = Leader("node-a", {"s1": completed("s1", signer)})
            await leader.sync(client)
            after = samples((await client.get("/metrics")).text)
            assert after[("meshnode_cloud_ledger_rows", ())] == 1
            assert after[("meshnode_cloud_receipts", ())] == 1
            assert after[("meshnode_cloud_sessions_ingested_total", ())] == 1
            assert after[("meshnode_cloud_ingest_seconds_count", ())] >= 1
            assert after[("meshnode_cloud_requests_total", ())] >= 1
            assert after[("meshnode_cloud_reviews_pending", ())] == 0
