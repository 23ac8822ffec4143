"""The push budget (`meshnode.core.Replicator`, invariant 2) seen from real Nodes under MockClock.

Three nodes on a MemoryNetwork (delivery is instant): what a change costs in
virtual time is only what the core makes it wait. With fewer neighbours than a
change's credits (`push_credits`), every change reaches every neighbour at once,
up to one every `flush_gap` (50 ms); the token bucket this replaces (two
flushes, then one per 0.4 s) made the third of three quick changes wait. The
bound under a rate a budget cannot cover is tests/test_core_replicator.py's.
"""

from __future__ import annotations

import trio

from meshnode._node import Node
from meshnode._transport import MemoryNetwork

from .test_sync import start_memory_node

NAMES = ("n1", "n2", "n3")


def held(node: Node, session_id: str) -> set[str]:
    doc = node.replica.docs.get(session_id)
    return {e["event_id"] for e in node.session_json(session_id)["events"]} if doc is not None else set()


async def test_changes_in_quick_succession_each_reach_every_neighbour_at_once(tmp_path, autojump_clock):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        nodes = {
            name: await start_memory_node(nursery, net, tmp_path, name, [p for p in NAMES if p != name])
            for name in NAMES
        }
        with trio.fail_after(30):
            while any(len(n.neighbours) < len(NAMES) - 1 for n in nodes.values()):
                await trio.sleep(0.05)
        a = nodes["n1"]
        sid = (await a.create_session("bay-1", 1, "TOKEN-1"))["session_id"]
        with trio.fail_after(5):
            while any(sid not in n.replica.docs for n in nodes.values()):
                await trio.sleep(0.01)
        await trio.sleep(2.0)
        for k in range(8):
            written = trio.current_time()
            event_id = (await a.record_event(sid, "meter", 100 * (k + 1)))["event_id"]
            with trio.fail_after(5):
                while any(event_id not in held(n, sid) for n in nodes.values()):
                    await trio.sleep(0.001)
            # Instant delivery: anything beyond the polling step is the core making it wait.
            assert trio.current_time() - written <= 0.01, k
            await trio.sleep(0.05)  # eight changes within 0.4 s (push_interval), at the ceiling's rate
        nursery.cancel_scope.cancel()
