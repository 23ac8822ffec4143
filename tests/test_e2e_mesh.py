"""End to end with real `meshnode run` processes on loopback: CoAP, HTTP, SIGKILL, restart."""

from __future__ import annotations

import random
import threading

import pytest

from .procs import NodeProcess, free_port, wait_until


@pytest.fixture
def cluster(tmp_path):
    nodes: list[NodeProcess] = []

    def make(n: int, peers_of, *, mdns: bool = False, first_host: int = 2) -> list[NodeProcess]:
        hosts = [f"127.0.11.{first_host + i}" for i in range(n)]
        coap, http = free_port(hosts[0]), free_port(hosts[0])
        for i in range(n):
            peers = [f"{hosts[j]}:{coap}" for j in peers_of(i, n)]
            nodes.append(
                NodeProcess(
                    f"node-{i + 1}",
                    hosts[i],
                    tmp_path / f"node-{i + 1}",
                    coap_port=coap,
                    http_port=http,
                    peers=peers,
                    mdns=mdns,
                )
            )
        for node in nodes:
            node.start()
        return nodes

    yield make
    for node in nodes:
        node.kill()


def events_of(node: NodeProcess, session_id: str) -> set[str]:
    return {e["event_id"] for e in node.get(f"/v1/sessions/{session_id}")["events"]}


def holds(node: NodeProcess, session_id: str, event_ids: set[str]) -> bool:
    try:
        return event_ids <= events_of(node, session_id)
    except Exception:
        return False


def test_line_of_four_with_static_peers_converges(cluster):
    nodes = cluster(4, lambda i, n: [j for j in (i - 1, i + 1) if 0 <= j < n])
    first, last = nodes[0], nodes[-1]
    r = first.post("/v1/sessions", {"charger": "c1", "connector": 1, "id_token": "TOKEN-A", "meter_wh": 500})
    assert r.status_code == 201
    sid = r.json()["session_id"]
    for wh in (500, 1200):
        assert first.post(f"/v1/sessions/{sid}/events", {"type": "meter", "meter_wh": wh}).status_code == 201
    assert first.post(f"/v1/sessions/{sid}/events", {"type": "stop", "meter_wh": 2000}).status_code == 201
    other = last.post("/v1/sessions", {"charger": "c4", "connector": 2, "id_token": "TOKEN-B", "meter_wh": 0}).json()[
        "session_id"
    ]

    def converged() -> bool:
        for node in nodes:
            a = node.get(f"/v1/sessions/{sid}")
            b = node.get(f"/v1/sessions/{other}")
            if (a["state"], a["energy_wh"], b["state"]) != ("completed", 1500, "charging"):
                return False
        return True

    wait_until(converged, what="both sessions on all four nodes")
    wait_until(lambda: all(n.get("/v1/status")["sync_state"] == "SYNCED" for n in nodes), what="SYNCED")
    # The saved Automerge document is served and identical everywhere.
    import httpx

    blobs = {httpx.get(n.url + f"/v1/sessions/{sid}/automerge").content for n in nodes}
    from automerge.core import Document

    assert len({tuple(sorted(Document.load(b).get_heads())) for b in blobs}) == 1


def test_sigkilled_node_restarts_and_catches_up(cluster):
    nodes = cluster(3, lambda i, n: [j for j in range(n) if j != i])
    victim = nodes[1]
    writers = [nodes[0], nodes[2]]
    acked: dict[str, set[str]] = {}
    sessions: dict[str, NodeProcess] = {}
    for w in writers:
        r = w.post("/v1/sessions", {"charger": w.name, "connector": 1, "id_token": "T", "meter_wh": 0})
        sid = r.json()["session_id"]
        sessions[sid] = w
        acked[sid] = {e["event_id"] for e in r.json()["events"]}
    stop = threading.Event()
    errors: list[str] = []

    def write(node: NodeProcess, sid: str) -> None:
        wh = 0
        rng = random.Random(node.name)
        while not stop.is_set():
            wh += rng.randrange(10, 100)
            r = node.post(f"/v1/sessions/{sid}/events", {"type": "meter", "meter_wh": wh})
            if r.status_code != 201:
                errors.append(r.text)
                return
            acked[sid].add(r.json()["event"]["event_id"])

    threads = [threading.Thread(target=write, args=(n, s)) for s, n in sessions.items()]
    for t in threads:
        t.start()
    wait_until(lambda: all(len(v) > 10 for v in acked.values()), what="writes before the kill")
    victim.kill()  # SIGKILL while the others write
    wait_until(lambda: all(len(v) > 40 for v in acked.values()), what="writes while the victim is down")
    victim.start()
    wait_until(lambda: all(len(v) > 60 for v in acked.values()), what="writes after the restart")
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    for node in nodes:
        for sid, ids in acked.items():
            wait_until(lambda: holds(node, sid, ids), what=f"{node.name} holding every acknowledged event")
    status = victim.get("/v1/status")
    assert status["incarnation"] == 2 and status["documents"] == 2


def test_three_nodes_find_each_other_by_mdns_alone(cluster):
    nodes = cluster(3, lambda i, n: [], mdns=True, first_host=20)
    wait_until(
        lambda: all(
            {p["node_id"] for p in n.get("/v1/status")["peers"]} == {m.name for m in nodes} - {n.name} for n in nodes
        ),
        timeout=60,
        what="every node to see the other two through mDNS",
    )
    r = nodes[0].post("/v1/sessions", {"charger": "c1", "connector": 1, "id_token": "TOKEN-M", "meter_wh": 100})
    sid = r.json()["session_id"]
    for wh in (100, 900, 1600):
        nodes[0].post(f"/v1/sessions/{sid}/events", {"type": "meter", "meter_wh": wh})

    def same() -> bool:
        views = [n.get(f"/v1/sessions/{sid}") for n in nodes]
        return all(
            (v["state"], v["energy_wh"], v["heads"]) == (views[0]["state"], 1500, views[0]["heads"]) for v in views
        )

    wait_until(same, what="the session with the same state and energy on all three nodes")
    assert nodes[2].get(f"/v1/sessions/{sid}")["state"] == "charging"
