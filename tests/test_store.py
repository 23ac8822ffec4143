"""DocStore: durable appends, group commit, load on start-up, compaction, crash safety."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from crdt import (
    DocStore,
    Replica,
    SqliteAdapter,
    add_event,
    fold_session,
    new_session_doc,
    open_doc_store,
    read_session,
)


ROOT = Path(__file__).resolve().parent.parent


def session(session_id: str):
    return new_session_doc(session_id, site="x", charger="c", connector=1, id_token="t", tariff={}, created_by="n")


async def test_write_then_reopen_loads_every_document(tmp_path, signer, keyring):
    path = tmp_path / "store.db"
    async with open_doc_store(path) as store:
        replica = Replica()
        for i in range(5):
            doc_id = f"s{i}"
            await store.write(doc_id, replica.add(doc_id, session(doc_id)))
            heads = replica.docs[doc_id].get_heads()
            add_event(replica.docs[doc_id], signer.sign("authorize", doc_id, i))
            await store.write(doc_id, replica.changes_since(doc_id, heads))
    reopened = DocStore(path)
    docs = reopened.load_all()
    reopened.close()
    assert sorted(docs) == [f"s{i}" for i in range(5)]
    for doc_id, doc in docs.items():
        assert doc.get_heads() == replica.docs[doc_id].get_heads()
        assert fold_session(doc, keyring)[1].state == "authorized"


class GatedAdapter(SqliteAdapter):
    """The real SQLite adapter whose first commit waits for a gate: writes pile up meanwhile."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.batch_sizes: list[int] = []

    def save_batch(self, puts, removes=()) -> None:
        if any(key[0] == "doc" for key, _ in puts):
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
            self.batch_sizes.append(len({key[1] for key, _ in puts if key[0] == "doc"}))
        super().save_batch(puts, removes)


async def test_every_write_waiting_during_a_commit_goes_into_the_next_one(tmp_path, signer):
    adapter = GatedAdapter(tmp_path / "store.db")
    replica = Replica()
    writes = [(f"s{i}", replica.add(f"s{i}", session(f"s{i}"))) for i in range(200)]
    async with open_doc_store(adapter=adapter) as store:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.write, *writes[0])
            await trio.to_thread.run_sync(adapter.entered.wait)  # the first commit is under way
            for doc_id, changes in writes[1:]:
                nursery.start_soon(store.write, doc_id, changes)
            await trio.testing.wait_all_tasks_blocked()  # all 199 are queued behind it
            adapter.gate.set()
        # Group commit: one commit for the first write, ONE for the 199 that waited.
        assert store.sync.commits == 2
        assert adapter.batch_sizes == [1, 199]
    check = DocStore(tmp_path / "store.db")
    assert len(check.doc_ids()) == 200
    check.close()


async def test_writing_the_same_change_twice_stores_it_once(tmp_path):
    async with open_doc_store(tmp_path / "store.db") as store:
        changes = Replica().add("s", session("s"))
        await store.write("s", changes)
        await store.write("s", changes)
        assert store.sync.change_count("s") == len(changes)


async def test_compaction_replaces_changes_with_a_snapshot(tmp_path, signer, keyring):
    path = tmp_path / "store.db"
    async with open_doc_store(path) as store:
        replica = Replica()
        await store.write("s", replica.add("s", session("s")))
        for i in range(30):
            heads = replica.docs["s"].get_heads()
            add_event(replica.docs["s"], signer.sign("authorize" if i == 0 else "reserve", "s", i))
            await store.write("s", replica.changes_since("s", heads))
        assert store.sync.change_count("s") == 31
        store.sync.compact("s", replica.docs["s"])
        assert store.sync.change_count("s") == 0
        # A change written after compaction is kept as a row on top of the snapshot.
        heads = replica.docs["s"].get_heads()
        add_event(replica.docs["s"], signer.sign("start", "s", 99))
        await store.write("s", replica.changes_since("s", heads))
    reopened = DocStore(path)
    doc = reopened.load("s")
    assert reopened.change_count("s") == 1
    reopened.close()
    assert doc.get_heads() == replica.docs["s"].get_heads()
    assert read_session(doc).events == read_session(replica.docs["s"]).events


async def test_archived_documents_are_left_out_of_start_up(tmp_path):
    path = tmp_path / "store.db"
    async with open_doc_store(path) as store:
        replica = Replica()
        for doc_id in ("live", "old"):
            await store.write(doc_id, replica.add(doc_id, session(doc_id)))
        store.sync.compact("old", replica.docs["old"], archive=True)
    reopened = DocStore(path)
    assert list(reopened.load_all()) == ["live"]
    assert sorted(reopened.load_all(include_archived=True)) == ["live", "old"]
    reopened.close()


def test_acknowledged_writes_survive_sigkill(tmp_path):
    """Kill a writing child at random moments; every acknowledged event must be there."""
    path = tmp_path / "store.db"
    rng = random.Random(20261122)
    acked: dict[str, set[str]] = {}
    for run in range(20):
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.store_child", str(path), str(run)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        child.kill()
        out, _ = child.communicate()
        for line in out.splitlines():
            if line.startswith("ack "):
                _, session_id, event_id = line.split()
                acked.setdefault(session_id, set()).add(event_id)
        # The store opens cleanly after every kill, and holds every ack so far.
        store = DocStore(path)
        docs = store.load_all()
        store.close()
        for session_id, event_ids in acked.items():
            assert session_id in docs, f"run {run}: acknowledged session {session_id} lost"
            missing = event_ids - set(read_session(docs[session_id]).events)
            assert not missing, f"run {run}: acknowledged events lost: {sorted(missing)[:3]}"
    assert sum(len(v) for v in acked.values()) > 20  # the children really wrote


async def test_inline_mode_writes_durably_without_threads(tmp_path, autojump_clock):
    path = tmp_path / "store.db"
    async with open_doc_store(path, inline=True) as store:
        replica = Replica()
        before = trio.current_time()
        await store.write("s", replica.add("s", session("s")))
        assert trio.current_time() == before  # no worker thread, so virtual time did not move
    check = DocStore(path)
    assert check.doc_ids() == ["s"]
    check.close()


async def test_encrypted_store_file_reveals_no_session_content(tmp_path, signer, keyring):
    import os

    import cbor2

    key = os.urandom(32)
    path = tmp_path / "store.db"
    session_id, token = "session-7f3a9c", "TOKEN-SECRET-4242"
    async with open_doc_store(path, key=key) as store:
        replica = Replica()
        doc = new_session_doc(
            session_id, site="x", charger="bay-9", connector=1, id_token=token, tariff={}, created_by="n"
        )
        await store.write(session_id, replica.add(session_id, doc))
        for wh in (123456, 234567):
            heads = doc.get_heads()
            add_event(doc, signer.sign("meter", session_id, 1, meter_wh=wh), public_key=signer.public_key)
            await store.write(session_id, replica.changes_since(session_id, heads))
        store.sync.set_meta("incarnation", b"\x00\x07")
        store.sync.compact(session_id, doc)
        heads = doc.get_heads()
        add_event(doc, signer.sign("stop", session_id, 2, meter_wh=345678), public_key=signer.public_key)
        await store.write(session_id, replica.changes_since(session_id, heads))
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("store.db"))
    for secret in (
        session_id.encode(),
        token.encode(),
        b"bay-9",
        b"meter_wh",
        b"charger-1",
        cbor2.dumps(345678),
        signer.public_key,
    ):
        assert secret not in raw, secret
    # ... while the store itself reads everything back with its key.
    store = DocStore(path, key=key)
    assert store.doc_ids() == [session_id]
    assert read_session(store.load(session_id)).id_token == token
    assert store.get_meta("incarnation") == b"\x00\x07"
    store.close()


def test_store_refuses_a_wrong_or_missing_key(tmp_path):
    import os

    from crdt import StoreError

    path = tmp_path / "store.db"
    DocStore(path, key=os.urandom(32)).close()
    with pytest.raises(StoreError, match="wrong store key"):
        DocStore(path, key=os.urandom(32))
    with pytest.raises(StoreError, match="is encrypted"):
        DocStore(path)
    plain = tmp_path / "plain.db"
    DocStore(plain).close()
    with pytest.raises(StoreError, match="without encryption"):
        DocStore(plain, key=os.urandom(32))


async def test_a_node_gets_its_store_and_device_key_through_seams(tmp_path, autojump_clock):
    """A node given a store opener and a device key touches no file, and restarts from the same disk."""
    import functools

    import nacl.signing

    from crdt import MemoryAdapter
    from meshnode._node import Node, NodeConfig
    from meshnode._transport import MemoryNetwork

    disk: dict = {}
    key = nacl.signing.SigningKey(bytes(range(32)))
    net = MemoryNetwork()
    data_dir = tmp_path / "never-created"

    async def run_node(body):
        async with net.transport("10.0.0.1:5683") as transport:
            node = Node(
                NodeConfig(node_id="n1", data_dir=data_dir, seed=1),
                transport=transport,
                wall_clock=lambda: 1_800_000_000 + trio.current_time(),
                device_key=key,
                store=functools.partial(open_doc_store, adapter=MemoryAdapter(disk), key=bytes(32)),
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(node.serve)
                result = await body(node)
                nursery.cancel_scope.cancel()
        return node, result

    async def create(node):
        return (await node.create_session("cp-1", 1, "tag-1"))["session_id"]

    async def noop(node):
        return None

    first, session_id = await run_node(create)
    assert first.signer.public_key == key.verify_key.encode()
    second, _ = await run_node(noop)
    assert session_id in second.replica.docs
    assert second.session_json(session_id)["state"] == first.session_json(session_id)["state"]
    assert not data_dir.exists()
    assert DocStore(adapter=MemoryAdapter(disk), key=bytes(32)).doc_ids() == sorted(second.replica.docs)


@pytest.mark.parametrize("kind, key", [("plain", None), ("encrypted", bytes(range(32)))])
def test_a_store_file_of_meshnode_0_1_is_converted_once_and_loses_nothing(tmp_path, kind, key):
    """tests/data holds files written by 0.1's DocStore (tables changes, snapshots, meta, names):
    session "s/one" compacted then given one more event, "s-two" archived, meta incarnation 7."""
    import shutil
    import sqlite3

    from crdt import StoreError

    path = tmp_path / "store.db"
    shutil.copy(ROOT / "tests" / "data" / f"store-0.1-{kind}.sqlite", path)
    if key is not None:
        with pytest.raises(StoreError, match="wrong store key"):
            DocStore(path, key=bytes(32))
    for _ in range(2):  # converted on the first open; the second open reads the new layout
        store = DocStore(path, key=key)
        assert store.doc_ids() == ["s-two", "s/one"]
        assert store.archived_ids() == ["s-two"]
        assert list(store.load_all()) == ["s/one"]
        docs = store.load_all(include_archived=True)
        assert len(read_session(docs["s/one"]).events) == 4
        assert len(read_session(docs["s-two"]).events) == 3
        assert store.change_count("s/one") == 1 and store.change_count("s-two") == 0
        assert store.get_meta("incarnation") == (7).to_bytes(8, "big")
        store.close()
    tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"kv"}
