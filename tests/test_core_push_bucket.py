"""The push bucket (`meshnode.core.Replicator`, invariant 2) seen from real Nodes under MockClock.

Three nodes on a MemoryNetwork (delivery is instant): what a change costs in
virtual time is only what the core makes it wait. A change made just after
another on the same node reaches every neighbour at once; with a plain push
slot it waited for the slot (0.4 s). A third within the interval still waits:
the bucket is bounded.
"""

from __future__ import annotations

import functools
from pathlib import Path

import trio

from crdt import MemoryAdapter, open_doc_store
from meshnode._discovery import StaticDiscovery
from meshnode._node import Node, NodeConfig
from meshnode._transport import MemoryNetwork

NAMES = ("n1", "n2", "n3")


def address(name: str) -> str:
    return f"10.0.0.{int(name[1:])}:5683"


async def start(tmp_path: Path, net: MemoryNetwork, nursery: trio.Nursery) -> dict[str, Node]:
    nodes: dict[str, Node] = {}

    async def run(name: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with net.transport(address(name)) as transport:
            node = Node(
                NodeConfig(node_id=name, data_dir=tmp_path / name, seed=7),
                transport=transport,
                discovery=StaticDiscovery([address(p) for p in NAMES if p != name]),
                wall_clock=lambda: 1_800_000_000 + trio.current_time(),
                store=functools.partial(open_doc_store, adapter=MemoryAdapter({})),
            )
            nodes[name] = node
            async with trio.open_nursery() as inner:
                await inner.start(node.serve)
                task_status.started()
                await trio.sleep_forever()

    for name in NAMES:
        await nursery.start(run, name)
    with trio.fail_after(30):
        while any(len(n.neighbours) < len(NAMES) - 1 for n in nodes.values()):
            await trio.sleep(0.05)
    return nodes


def held(node: Node, session_id: str) -> set[str]:
    doc = node.replica.docs.get(session_id)
    return {e["event_id"] for e in node.session_json(session_id)["events"]} if doc is not None else set()


async def test_back_to_back_changes_on_one_node_reach_every_neighbour_at_once(tmp_path, autojump_clock):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        nodes = await start(tmp_path, net, nursery)
        a = nodes["n1"]
        sid = (await a.create_session("bay-1", 1, "TOKEN-1"))["session_id"]
        with trio.fail_after(5):
            while any(sid not in n.replica.docs for n in nodes.values()):
                await trio.sleep(0.01)
        await trio.sleep(2.0)  # quiet: the bucket is full again
        for k in range(2):
            written = trio.current_time()
            event_id = (await a.record_event(sid, "meter", 100 * (k + 1)))["event_id"]
            with trio.fail_after(5):
                while any(event_id not in held(n, sid) for n in nodes.values()):
                    await trio.sleep(0.001)
            # Instant delivery: anything beyond the polling step is the core making it wait.
            assert trio.current_time() - written <= 0.01, k
            await trio.sleep(0.02)  # the next change follows within push_interval (0.4 s)
        # A third one within the interval finds the bucket empty and waits for it:
        # the bucket is bounded (0.4 s after the first of the two).
        written = trio.current_time()
        event_id = (await a.record_event(sid, "meter", 300))["event_id"]
        with trio.fail_after(5):
            while any(event_id not in held(n, sid) for n in nodes.values()):
                await trio.sleep(0.001)
        assert 0.2 < trio.current_time() - written <= 0.4
        nursery.cancel_scope.cancel()
