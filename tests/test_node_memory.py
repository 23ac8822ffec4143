"""The Node on in-memory seams, under virtual time: replication, line topology, restart, status."""

from __future__ import annotations

import functools
from pathlib import Path

import trio

from crdt import MemoryAdapter, open_doc_store
from meshnode._discovery import StaticDiscovery
from meshnode._node import Node, NodeConfig
from meshnode.services import Conflict, InvalidCommand, NotFound
from meshnode._transport import MemoryNetwork

import pytest


class Mesh:
    """Nodes on a MemoryNetwork, each knowing only the static peers it is given."""

    def __init__(self, tmp_path: Path, nursery: trio.Nursery, *, memory_store: bool = False) -> None:
        self.tmp_path = tmp_path
        # An in-memory store commits inline: with SQLite in a worker thread, the autojump
        # clock moves on while a commit runs, by as much as the load on the machine decides.
        self.disks: dict[str, dict] | None = {} if memory_store else None
        self.nursery = nursery
        self.net = MemoryNetwork()
        self.nodes: dict[str, Node] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.stopped: dict[str, trio.Event] = {}

    def address(self, name: str) -> str:
        return f"10.0.0.{int(name[1:])}:5683"

    async def start(self, name: str, peers: list[str]) -> Node:
        holder: dict[str, Node] = {}

        stopped = self.stopped[name] = trio.Event()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                await serve(task_status)
            finally:
                stopped.set()

        async def serve(task_status):
            with trio.CancelScope() as scope:
                self.scopes[name] = scope
                async with self.net.transport(self.address(name)) as transport:
                    node = Node(
                        NodeConfig(node_id=name, data_dir=self.tmp_path / name, seed=7),
                        transport=transport,
                        discovery=StaticDiscovery([self.address(p) for p in peers]),
                        wall_clock=lambda: 1_800_000_000 + trio.current_time(),
                        store=None
                        if self.disks is None
                        else functools.partial(open_doc_store, adapter=MemoryAdapter(self.disks.setdefault(name, {}))),
                    )
                    holder["node"] = node
                    async with trio.open_nursery() as inner:
                        await inner.start(node.serve)
                        task_status.started()
                        await trio.sleep_forever()

        await self.nursery.start(run)
        self.nodes[name] = holder["node"]
        return holder["node"]

    async def stop(self, name: str) -> None:
        """Cancel the node and wait until its address is free again."""
        self.scopes.pop(name).cancel()
        self.nodes.pop(name)
        await self.stopped.pop(name).wait()


async def wait_for(predicate, timeout=120.0, step=0.25):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)
    return trio.current_time()


def same_everywhere(nodes, session_id, state, energy):
    for node in nodes:
        if session_id not in node.replica.docs:
            return False
        s = node.session_json(session_id)
        if (s["state"], s["energy_wh"]) != (state, energy):
            return False
    return True


async def test_three_nodes_replicate_a_session(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        mesh = Mesh(tmp_path, nursery, memory_store=True)
        a = await mesh.start("n1", ["n2", "n3"])
        b = await mesh.start("n2", ["n1"])
        c = await mesh.start("n3", ["n1"])
        session = await a.create_session("charger-1", 1, "TOKEN-1")
        sid = session["session_id"]
        await a.record_event(sid, "meter", 1000)
        await a.record_event(sid, "meter", 2500)
        await a.record_event(sid, "stop", 4000)
        await wait_for(lambda: same_everywhere([a, b, c], sid, "completed", 3000))
        assert b.session_json(sid)["events"] == a.session_json(sid)["events"]
        await wait_for(lambda: all(n.status_json()["sync_state"] == "SYNCED" for n in (a, b, c)))
        # n2 and n3 share no link: n2 learns of n3 through n1's membership gossip,
        # which may take a round longer than the documents do.
        await wait_for(lambda: {p["node_id"] for p in b.status_json()["peers"]} == {"n1", "n3"})
        status = b.status_json()
        assert {p["node_id"] for p in status["peers"]} == {"n1", "n3"}
        assert status["documents"] == 1 and status["documents_not_everywhere"] == 0
        for node in mesh.nodes.values():  # the digests' per-document hashes, kept at each change
            assert node._heads_hashes() == node.replica.heads_hashes()
        nursery.cancel_scope.cancel()


async def test_line_of_four_converges_end_to_end(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        mesh = Mesh(tmp_path, nursery, memory_store=True)
        names = ["n1", "n2", "n3", "n4"]
        for i, name in enumerate(names):
            await mesh.start(name, [names[j] for j in (i - 1, i + 1) if 0 <= j < len(names)])
        # Only neighbours can reach each other.
        for x in names:
            for y in names:
                if x != y and abs(names.index(x) - names.index(y)) > 1:
                    mesh.net.set_link(mesh.address(x), mesh.address(y), False)
        first, last = mesh.nodes["n1"], mesh.nodes["n4"]
        sid = (await first.create_session("c1", 1, "T"))["session_id"]
        await first.record_event(sid, "stop", 700)
        sid2 = (await last.create_session("c4", 2, "U"))["session_id"]
        await wait_for(lambda: same_everywhere(mesh.nodes.values(), sid, "completed", 0))
        await wait_for(lambda: same_everywhere(mesh.nodes.values(), sid2, "charging", 0))
        nursery.cancel_scope.cancel()


async def test_restarted_node_catches_up_and_keeps_its_data(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        mesh = Mesh(tmp_path, nursery, memory_store=True)
        a = await mesh.start("n1", ["n2"])
        b = await mesh.start("n2", ["n1"])
        own = (await b.create_session("cb", 1, "B"))["session_id"]
        await wait_for(lambda: own in a.replica.docs)
        incarnation = b.status_json()["incarnation"]
        await mesh.stop("n2")
        sid = (await a.create_session("ca", 1, "A"))["session_id"]
        for wh in (100, 200, 300):
            await a.record_event(sid, "meter", wh)
        b = await mesh.start("n2", ["n1"])
        assert own in b.replica.docs  # from its own store
        assert b.status_json()["incarnation"] == incarnation + 1
        await wait_for(lambda: same_everywhere([a, b], sid, "charging", 200))
        # Its event chain continues where it stopped: the new event links to the old one.
        await b.record_event(own, "stop", 10)
        assert b.session_json(own)["conflicts"] == []
        nursery.cancel_scope.cancel()


async def test_local_requests_are_checked(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        mesh = Mesh(tmp_path, nursery, memory_store=True)
        a = await mesh.start("n1", [])
        sid = (await a.create_session("c", 1, "T"))["session_id"]
        with pytest.raises(NotFound):
            await a.record_event("nope", "meter", 1)
        for kind, wh, error in (
            ("meter", None, InvalidCommand),
            ("explode", 1, InvalidCommand),
            ("resume", None, Conflict),
        ):
            with pytest.raises(error):
                await a.record_event(sid, kind, wh)
        await a.record_event(sid, "meter", 50)
        with pytest.raises(Conflict, match="below the last reading"):
            await a.record_event(sid, "meter", 40)
        assert a.status_json()["sync_state"] == "OFFLINE"
        nursery.cancel_scope.cancel()


async def test_a_starting_node_answers_not_ready_never_not_found(tmp_path, autojump_clock):
    """Issue 10 item 6: routes exist from construction and answer 5.03 until the node serves."""
    from meshnode._protocol import SyncRequest
    from meshnode._transport import RemoteRefused

    net = MemoryNetwork()
    async with net.transport("10.0.0.1:5683") as t1, net.transport("10.0.0.2:5683") as t2:
        node = Node(NodeConfig(node_id="n1", data_dir=tmp_path / "n1", seed=7), transport=t1)
        for resource in ("/m/sync", "/m/state", "/m/push", "/m/digest", "/m/hello"):
            with pytest.raises(RemoteRefused) as info:
                await t2.request(t1.address, resource, SyncRequest("n2", {}).encode())
            assert info.value.code == "5.03", resource
        async with trio.open_nursery() as nursery:
            await nursery.start(node.serve)
            await t2.request(t1.address, "/m/hello", method="GET")
            nursery.cancel_scope.cancel()


async def test_unverified_senders_create_no_peers(tmp_path, autojump_clock):
    """Issue 10 item 5: a request from an id nobody verified (no answered hello,
    no seal) leaves no neighbour behind, even with a bogus address; a real
    peer that answers a hello becomes one."""
    from meshnode._protocol import Hello, StateRequest
    from meshnode._membership import DIGEST_SIZE

    async with trio.open_nursery() as nursery:
        mesh = Mesh(tmp_path, nursery, memory_store=True)
        a = await mesh.start("n1", [])
        async with mesh.net.transport("10.0.0.9:5683") as stranger:
            for i in range(40):
                address = f"10.0.1.{i}:5683" if i % 2 else f"127.0.0.{500 + i}:5683"  # some plausible
                hello = Hello(f"ghost-{i}", address, 1, bytes(32), "default")
                await stranger.request(a.transport.address, "/m/hello", hello.encode())
                state = StateRequest(f"ghost-{i}", bytes(8), bytes(DIGEST_SIZE))
                await stranger.request(a.transport.address, "/m/state", state.encode())
            await trio.sleep(120)
            assert a.neighbours == {}
            assert a.engine.hellos.unverified == {}  # the greet-back list emptied itself
        b = await mesh.start("n2", ["n1"])
        await wait_for(lambda: "n2" in a.neighbours and "n1" in b.neighbours)
        nursery.cancel_scope.cancel()
