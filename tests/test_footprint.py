"""What a node holds in memory: its sessions as saved bytes, only the recently used loaded.

A node that holds many sessions, most of them closed, keeps at most `LOADED_DOCUMENTS`
of them loaded (`crdt.Documents`); the others are loaded when read, and go back to bytes.
The claim that matters is that nothing else changes: a new peer still gets every
session, the heads-hash still agrees, and the forwarder still brings every one to the
cloud. In process, on in-memory seams, under virtual time.
"""

from __future__ import annotations

import functools

import httpx
import pytest
import trio

import meshnode._node
from crdt import SITE_CONFIG_ID, MemoryAdapter, open_doc_store
from meshnode._discovery import StaticDiscovery
from meshnode._node import Node, NodeConfig
from meshnode._transport import MemoryNetwork
from uplink import CloudClient

from .test_forwarder import FakeCloud

CAPACITY = 4
SESSIONS = 12
NOW = 1_800_000_000


def address(name: str) -> str:
    return f"10.0.0.{int(name[1:])}:5683"


async def start(
    nursery: trio.Nursery, net: MemoryNetwork, tmp_path, name: str, peers: list[str], disk: dict, cloud=None
) -> tuple[Node, trio.CancelScope]:
    holder: dict[str, object] = {}

    async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            holder["scope"] = scope
            async with net.transport(address(name)) as transport:
                node = Node(
                    NodeConfig(
                        node_id=name,
                        data_dir=tmp_path / name,
                        seed=7,
                        cloud_url="http://cloud.invalid" if cloud else None,
                    ),
                    transport=transport,
                    discovery=StaticDiscovery([address(p) for p in peers]),
                    wall_clock=lambda: NOW + trio.current_time(),
                    store=functools.partial(open_doc_store, adapter=MemoryAdapter(disk)),
                    cloud=cloud,
                )
                holder["node"] = node
                async with trio.open_nursery() as inner:
                    await inner.start(node.serve)
                    task_status.started()
                    await trio.sleep_forever()

    await nursery.start(run)
    return holder["node"], holder["scope"]  # type: ignore[return-value]


async def wait_for(predicate, timeout: float = 600.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.25)


def loaded_sessions(node: Node) -> list[str]:
    return [d for d in node.documents if d != SITE_CONFIG_ID and node.documents.is_loaded(d)]


def fake_cloud() -> tuple[FakeCloud, CloudClient]:
    cloud = FakeCloud()

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/healthz":
            return httpx.Response(200, json={"status": "ok"})
        return await cloud.handle(request)

    client = CloudClient("http://cloud.invalid", client=httpx.AsyncClient(transport=httpx.MockTransport(handle)))
    return cloud, client


async def test_closed_sessions_are_held_as_bytes_and_still_sync_to_a_new_peer_and_reach_the_cloud(
    tmp_path, autojump_clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(meshnode._node, "LOADED_DOCUMENTS", CAPACITY)
    net = MemoryNetwork()
    disk: dict = {}
    async with trio.open_nursery() as nursery:
        # A node alone runs and closes SESSIONS sessions, then stops.
        n1, scope = await start(nursery, net, tmp_path, "n1", [], disk)
        sids = []
        for i in range(SESSIONS):
            sid = (await n1.create_session(f"cp-{i}", 1, f"tag-{i}", meter_wh=0))["session_id"]
            await n1.record_event(sid, "meter", 1000 + i)
            await n1.record_event(sid, "stop", 2000 + i)
            sids.append(sid)
        assert len(loaded_sessions(n1)) <= CAPACITY  # while it wrote them, too
        scope.cancel()
        await trio.sleep(1)

        # Restarted with an uplink, beside a new, empty peer.
        cloud, client = fake_cloud()
        n1, _ = await start(nursery, net, tmp_path, "n1", ["n2"], disk, cloud=client)
        assert len(n1.documents) == SESSIONS + 1
        assert len(loaded_sessions(n1)) <= CAPACITY, "a restarted node loads every session it holds"
        heads = {sid: n1.documents.heads(sid) for sid in sids}
        assert all(n1.session_json(sid)["state"] == "completed" for sid in sids)
        n2, _ = await start(nursery, net, tmp_path, "n2", ["n1"], {})

        # The new peer gets every session at the same heads; the heads-hashes agree.
        await wait_for(lambda: all(sid in n2.replica.docs for sid in sids))
        await wait_for(lambda: all(n2.documents.heads(sid) == heads[sid] for sid in sids))
        await wait_for(lambda: n1.heads_hash() == n2.heads_hash())
        assert [n2.session_json(sid)["energy_wh"] for sid in sids] == [2000 + i for i in range(SESSIONS)]

        # The forwarder brings every session to the cloud, complete.
        await wait_for(lambda: all(sid in cloud.replica.docs for sid in sids))
        await wait_for(lambda: all(sorted(cloud.replica.docs[sid].get_heads()) == sorted(heads[sid]) for sid in sids))

        # And after all that, the node holds no more loaded than before.
        assert n1.documents.loads > 0
        assert len(loaded_sessions(n1)) <= CAPACITY
        assert len(loaded_sessions(n2)) <= CAPACITY
        nursery.cancel_scope.cancel()


async def test_start_up_loads_each_stored_document_once_and_keeps_few_loaded(
    tmp_path, autojump_clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up folds every stored session (the forwarder and retention need their state) and
    resumes the node's event chain from those folds: one load per document, not one per pass."""
    monkeypatch.setattr(meshnode._node, "LOADED_DOCUMENTS", CAPACITY)
    net = MemoryNetwork()
    disk: dict = {}
    async with trio.open_nursery() as nursery:
        n1, scope = await start(nursery, net, tmp_path, "n1", [], disk)
        sids = [(await n1.create_session(f"cp-{i}", 1, f"tag-{i}", meter_wh=0))["session_id"] for i in range(SESSIONS)]
        await n1.record_event(sids[0], "meter", 500)
        scope.cancel()
        await trio.sleep(1)
        n1, _ = await start(nursery, net, tmp_path, "n1", [], disk)
        assert n1.documents.loads == len(n1.documents) == SESSIONS + 1
        assert len(loaded_sessions(n1)) <= CAPACITY
        # Reading every session through the API loads none of them again (cached folds, known heads).
        states = [s["state"] for s in n1.sessions_json()]
        assert states == ["charging"] * SESSIONS
        assert n1.documents.loads == SESSIONS + 1
        # The chain resumed after the last stored event: the next one links to it.
        await n1.record_event(sids[0], "meter", 600)
        assert n1.session_json(sids[0])["conflicts"] == []
        nursery.cancel_scope.cancel()
