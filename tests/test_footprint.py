"""What a node holds in memory: its sessions as saved bytes, only the recently used loaded.

A node that holds many sessions, most of them closed, keeps at most `LOADED_DOCUMENTS`
of them loaded (`crdt.Documents`); the others are loaded when read, and go back to bytes.
The claim that matters is that nothing else changes: a new peer still gets every
session, the heads-hash still agrees, and the forwarder still brings every one to the
cloud. In process, on in-memory seams, under virtual time.
"""

from __future__ import annotations

import httpx
import pytest
import trio

import meshnode._node
from crdt import SITE_CONFIG_ID
from meshnode._node import Node
from meshnode._transport import MemoryNetwork
from uplink import CloudClient

from .test_forwarder import FakeCloud
from .test_sync import start_memory_node

CAPACITY = 4
SESSIONS = 12


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
    # A node alone runs and closes SESSIONS sessions, then stops.
    async with trio.open_nursery() as first:
        n1 = await start_memory_node(first, net, tmp_path, "n1", disk=disk)
        sids = []
        for i in range(SESSIONS):
            sid = (await n1.create_session(f"cp-{i}", 1, f"tag-{i}", meter_wh=0))["session_id"]
            await n1.record_event(sid, "meter", 1000 + i)
            await n1.record_event(sid, "stop", 2000 + i)
            sids.append(sid)
        assert len(loaded_sessions(n1)) <= CAPACITY  # while it wrote them, too
        first.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        # Restarted with an uplink, beside a new, empty peer.
        cloud, client = fake_cloud()
        n1 = await start_memory_node(nursery, net, tmp_path, "n1", ["n2"], disk=disk, cloud=client)
        assert len(n1.documents) == SESSIONS + 1
        assert len(loaded_sessions(n1)) <= CAPACITY, "a restarted node loads every session it holds"
        heads = {sid: n1.documents.heads(sid) for sid in sids}
        assert all(n1.session_json(sid)["state"] == "completed" for sid in sids)
        n2 = await start_memory_node(nursery, net, tmp_path, "n2", ["n1"])

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
    async with trio.open_nursery() as first:
        n1 = await start_memory_node(first, net, tmp_path, "n1", disk=disk)
        sids = [(await n1.create_session(f"cp-{i}", 1, f"tag-{i}", meter_wh=0))["session_id"] for i in range(SESSIONS)]
        await n1.record_event(sids[0], "meter", 500)
        first.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        n1 = await start_memory_node(nursery, net, tmp_path, "n1", disk=disk)
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
