"""Sync bookkeeping: digests find differing documents; bad sync messages change nothing."""

from __future__ import annotations

import functools

import pytest

from crdt import (
    DocumentError,
    InvalidSyncMessage,
    Replica,
    add_event,
    bucket_entries,
    differing_buckets,
    differing_docs,
    heads_hash,
    make_digest,
    new_session_doc,
    read_session,
)


def session(doc_id):
    return new_session_doc(doc_id, site="x", charger="c", connector=1, id_token="t", tariff={}, created_by="n")


def full_sync(a: Replica, b: Replica, doc_id: str) -> int:
    rounds = 0
    while True:
        moved = False
        for src, dst, sname, dname in ((a, b, "a", "b"), (b, a, "b", "a")):
            msg = src.generate(dname, doc_id)
            if msg is not None:
                dst.receive(sname, doc_id, msg)
                moved = True
        if not moved:
            return rounds
        rounds += 1
        assert rounds < 20


def test_digest_finds_exactly_the_differing_documents(signer):
    a, b = Replica(), Replica()
    for i in range(300):
        a.add(f"s{i}", session(f"s{i}"))
    for i in range(300):
        full_sync(a, b, f"s{i}")
    assert make_digest(a.heads_hashes()) == make_digest(b.heads_hashes())
    add_event(a.docs["s7"], signer.sign("authorize", "s7", 1))
    add_event(b.docs["s150"], signer.sign("authorize", "s150", 1))
    a.add("only-a", session("only-a"))
    buckets = differing_buckets(make_digest(a.heads_hashes()), make_digest(b.heads_hashes()))
    assert 1 <= len(buckets) <= 3
    mine = bucket_entries(a.heads_hashes(), buckets)
    theirs = bucket_entries(b.heads_hashes(), buckets)
    assert len(mine) < 300  # only the entries of differing buckets are exchanged
    assert differing_docs(mine, theirs) == {"s7", "s150", "only-a"}


def test_heads_hash_ignores_order():
    assert heads_hash([b"\x01" * 32, b"\x02" * 32]) == heads_hash([b"\x02" * 32, b"\x01" * 32])
    assert heads_hash([b"\x01" * 32]) != heads_hash([b"\x02" * 32])


def test_sync_brings_a_new_replica_the_document(signer):
    a, b = Replica(), Replica()
    a.add("s", session("s"))
    add_event(a.docs["s"], signer.sign("authorize", "s", 1))
    full_sync(a, b, "s")
    assert b.docs["s"].get_heads() == a.docs["s"].get_heads()


@pytest.mark.parametrize(
    "data", [b"", b"\x00", b"garbage bytes", b"\x42" + b"\xff" * 40], ids=["empty", "zero", "text", "bad-body"]
)
def test_invalid_sync_message_changes_nothing(data, signer):
    a = Replica()
    a.add("s", session("s"))
    heads = a.docs["s"].get_heads()
    with pytest.raises(InvalidSyncMessage):
        a.receive("peer", "s", data)
    with pytest.raises(InvalidSyncMessage):
        a.receive("peer", "new-doc", data)
    assert a.docs["s"].get_heads() == heads and "new-doc" not in a.docs


def test_truncated_sync_message_is_refused(signer):
    a, b = Replica(), Replica()
    a.add("s", session("s"))
    add_event(a.docs["s"], signer.sign("authorize", "s", 1))
    # b asks, a answers with its changes; deliver a's answer truncated.
    b_msg = b.generate("a", "s")
    a.receive("b", "s", b_msg)
    answer = a.generate("b", "s")
    assert answer is not None and len(answer) > 40
    with pytest.raises(InvalidSyncMessage):
        b.receive("a", "s", answer[: len(answer) // 2])
    assert "s" not in b.docs
    # The sender learns of the refusal (a 4.xx on the wire) and starts that sync afresh.
    a.book.reset("b", "s")
    full_sync(a, b, "s")
    assert b.docs["s"].get_heads() == a.docs["s"].get_heads()


def test_new_document_refused_by_validator_is_not_adopted(signer):
    from automerge.core import ROOT, Document, ScalarType

    rogue = Document()
    with rogue.transaction() as tx:
        tx.put(ROOT, "not", ScalarType.Str, "a session")
    a, b = Replica({"s": rogue}), Replica()
    b_first = b.generate("a", "s")
    a.receive("b", "s", b_first)
    with pytest.raises(InvalidSyncMessage, match="not acceptable"):
        b.receive("a", "s", a.generate("b", "s"), validate=read_session)
    assert "s" not in b.docs
    with pytest.raises(DocumentError):
        read_session(rogue)


@pytest.mark.parametrize(
    "hex_message,why",
    [
        ("42000001000301000100", "0 bits per entry"),  # Automerge would panic on the next generate
        ("420000010007010a808040000000", "probes"),  # 2**20 probes: Automerge would allocate per probe
        ("44000000", "unknown type"),
        ("4201", "past the end|LEB128"),
    ],
)
def test_sync_messages_automerge_trusts_too_much_are_refused(hex_message, why):
    a = Replica()
    a.add("s", session("s"))
    heads = a.docs["s"].get_heads()
    with pytest.raises(InvalidSyncMessage, match=why):
        a.receive("peer", "s", bytes.fromhex(hex_message))
    assert a.docs["s"].get_heads() == heads
    assert a.generate("peer", "s") is not None  # and the node can still talk to that peer


def test_another_documents_history_is_not_grafted_on(signer):
    a, b = Replica(), Replica()
    a.add("s", session("s"))
    b.add("s", session("s"))  # an independent creation under the same id: another root change
    a_first = a.generate("b", "s")
    b.receive("a", "s", a_first)
    heads = a.docs["s"].get_heads()
    with pytest.raises(InvalidSyncMessage, match="unrelated history"):
        a.receive("b", "s", b.generate("a", "s"))
    assert a.docs["s"].get_heads() == heads


# --------------------------------------------------------------------------
# The node path: node-to-node sync is a crdt.SyncSession on both sides


class _RecordingNetwork:
    """Builds a MemoryNetwork that records the size of every /m/sync message."""

    @staticmethod
    def make():
        from meshnode._transport import MemoryNetwork

        class Net(MemoryNetwork):
            def __init__(self) -> None:
                super().__init__()
                self.sizes: list[tuple[bool, int]] = []

            async def carry(self, src, dst, resource, payload, *, response):
                if resource == "/m/sync":
                    self.sizes.append((response, len(payload)))
                return True

        return Net()


def address(name):
    """The MemoryNetwork address of node `n<k>`."""
    return f"10.0.0.{int(name[1:])}:5683"


async def start_memory_node(nursery, net, tmp_path, name, peers=(), *, disk=None, cloud=None, **config):
    """A real `Node` named `name` (`n<k>`) on the MemoryNetwork `net`, with an
    in-memory store, the wall clock tied to trio's (MockClock) and `peers` (names)
    as its static discovery; it serves until `nursery` is cancelled. `disk`: the
    store's dict (pass the same one to restart a node on its data); `cloud`: an
    uplink client (the node then forwards to it); `config`: further `NodeConfig`
    fields. Shared with tests/test_core_push_budget.py and tests/test_footprint.py."""
    import trio

    from crdt import MemoryAdapter, open_doc_store
    from meshnode._discovery import StaticDiscovery
    from meshnode._node import Node, NodeConfig

    holder = {}

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        async with net.transport(address(name)) as transport:
            node = Node(
                NodeConfig(
                    node_id=name,
                    data_dir=tmp_path / name,
                    seed=7,
                    cloud_url="http://cloud.invalid" if cloud is not None else None,
                    **config,
                ),
                transport=transport,
                discovery=StaticDiscovery([address(p) for p in peers]),
                wall_clock=lambda: 1_800_000_000 + trio.current_time(),
                store=functools.partial(open_doc_store, adapter=MemoryAdapter({} if disk is None else disk)),
                cloud=cloud,
            )
            holder["node"] = node
            async with trio.open_nursery() as inner:
                await inner.start(node.serve)
                task_status.started()
                await trio.sleep_forever()

    await nursery.start(run)
    return holder["node"]


class _Pair:
    """Two nodes on a MemoryNetwork that know nothing of each other (no gossip, no
    anti-entropy): the test runs the sync exchange itself."""

    def __init__(self, tmp_path, nursery):
        self.tmp_path, self.nursery = tmp_path, nursery
        self.net = _RecordingNetwork.make()
        self.nodes = {}

    address = staticmethod(address)

    async def start(self, name):
        node = await start_memory_node(self.nursery, self.net, self.tmp_path, name, request_timeout=2.0)
        self.nodes[name] = node
        return node


async def _sessions(node, n, readings=6):
    out = []
    for i in range(n):
        sid = (await node.create_session(f"bay-{node.node_id}-{i}", 1, f"TOKEN-{i}"))["session_id"]
        for r in range(readings):
            await node.record_event(sid, "meter", 100 * (r + 1))
        out.append(sid)
    return out


async def test_node_sync_moves_documents_both_ways_in_byte_bounded_requests_and_responses(
    tmp_path, autojump_clock, monkeypatch
):
    import trio

    import meshnode._node as node_module

    cap = 6000
    monkeypatch.setattr(node_module, "MAX_BATCH_BYTES", cap)
    async with trio.open_nursery() as nursery:
        pair = _Pair(tmp_path, nursery)
        a, b = await pair.start("n1"), await pair.start("n2")
        mine, theirs = await _sessions(a, 8), await _sessions(b, 8)
        docs = sorted(mine + theirs)
        await a._sync_docs("n2", pair.address("n2"), docs)
        for d in docs:
            assert d in a.replica.docs and d in b.replica.docs, d
            assert sorted(a.replica.docs[d].get_heads()) == sorted(b.replica.docs[d].get_heads())
        # Both directions carried more than one cap's worth, so the cap split them...
        requests = [s for r, s in pair.net.sizes if not r]
        responses = [s for r, s in pair.net.sizes if r]
        assert sum(requests) > 2 * cap and sum(responses) > 2 * cap
        # ...and no message went far past it (one sync message may exceed it alone).
        largest = max(len(a.replica.docs[d].save()) for d in docs)
        assert max(requests + responses) < cap + 2 * largest
        # What arrived was stored and announced as received.
        assert a.counters["changes_received"] > 0 and b.counters["changes_received"] > 0
        assert set(theirs) <= set(await a.store.load_all()) and set(mine) <= set(await b.store.load_all())
        nursery.cancel_scope.cancel()


async def test_node_sync_responder_gives_up_when_the_requesters_ttl_passes_before_its_turn(tmp_path, autojump_clock):
    import trio

    from meshnode._transport import TransportError

    async with trio.open_nursery() as nursery:
        pair = _Pair(tmp_path, nursery)
        a, b = await pair.start("n1"), await pair.start("n2")
        mine = await _sessions(a, 2)
        # b is busy applying something else for longer than a waits: a's request
        # times out (or meets b's 5.03), and b, once a's ttl has passed, gives up.
        await b._receive_lock.acquire()
        with pytest.raises(TransportError):
            await a._sync_docs("n2", pair.address("n2"), mine)
        with trio.fail_after(5):
            while b.counters.get("sync_requests_abandoned") != 1:
                await trio.sleep(0.01)
        assert not set(mine) & set(b.replica.docs)  # nothing applied
        # The initiator dropped the sync states of the batch: the next exchange starts
        # afresh and brings everything.
        b._receive_lock.release()
        await a._sync_docs("n2", pair.address("n2"), mine)
        assert set(mine) <= set(b.replica.docs)
        nursery.cancel_scope.cancel()


async def test_node_sync_a_document_the_peer_refuses_leaves_the_rest_of_the_batch_alone(tmp_path, autojump_clock):
    import trio

    from crdt import new_session_doc

    async with trio.open_nursery() as nursery:
        pair = _Pair(tmp_path, nursery)
        a, b = await pair.start("n1"), await pair.start("n2")
        good = await _sessions(a, 2)
        # A document stored under another session's id: b's validator refuses it,
        # the rest of the batch goes on.
        alien = new_session_doc("s-other", site="default", charger="c", connector=1, id_token="t", tariff={},
                                created_by="n1")  # fmt: skip
        a.replica.add("s-alien", alien)
        await a._sync_docs("n2", pair.address("n2"), sorted([*good, "s-alien"]))
        assert set(good) <= set(b.replica.docs)
        assert "s-alien" not in b.replica.docs
        assert b.counters["sync_requests_refused"] >= 1
        nursery.cancel_scope.cancel()


async def test_a_lost_push_is_repaired_by_the_next_push_not_by_the_next_exchange(tmp_path, autojump_clock):
    """b misses a push from a; a's next push builds on the lost change, so b syncs
    that document with a at once (gap repair) instead of waiting for anti-entropy."""
    import trio

    from meshnode._transport import MemoryNetwork

    class Lossy(MemoryNetwork):
        def __init__(self) -> None:
            super().__init__()
            self.drop_next_push = False
            self.syncs = 0

        async def carry(self, src, dst, resource, payload, *, response):
            if resource == "/m/sync" and not response:
                self.syncs += 1
            if resource == "/m/push" and self.drop_next_push:
                self.drop_next_push = False
                return False
            return True

    net = Lossy()
    async with trio.open_nursery() as nursery:
        # Anti-entropy far apart: only the gap repair can bring the change in time.
        a = await start_memory_node(nursery, net, tmp_path, "n1", ["n2"], gossip_interval=60.0)
        b = await start_memory_node(nursery, net, tmp_path, "n2", ["n1"], gossip_interval=60.0)
        with trio.fail_after(30):
            while "n2" not in a.neighbours or "n1" not in b.neighbours:
                await trio.sleep(0.05)
        sid = (await a.create_session("bay-1", 1, "TOKEN-1"))["session_id"]
        with trio.fail_after(5):
            while sid not in b.replica.docs:
                await trio.sleep(0.05)
        await trio.sleep(1.0)  # the initial exchanges are over
        syncs = net.syncs
        net.drop_next_push = True
        lost = (await a.record_event(sid, "meter", 100))["event_id"]
        await trio.sleep(1.0)  # a's pushes of the session are over

        def held():
            return {e["event_id"] for e in b.session_json(sid)["events"]}

        assert not net.drop_next_push and lost not in held()
        after = (await a.record_event(sid, "meter", 200))["event_id"]
        with trio.fail_after(2):  # not the next exchange, 60 s +-20 % away
            while not {lost, after} <= held():
                await trio.sleep(0.05)
        assert net.syncs > syncs
        nursery.cancel_scope.cancel()
