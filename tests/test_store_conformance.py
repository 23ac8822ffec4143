"""Conformance suite for the storage seam, run against both adapters.

Every test that takes the ``medium`` fixture runs twice: on `MemoryAdapter`
(a dict that outlives the adapter, as a disk outlives a process) and on
`SqliteAdapter` (a real file), so the fake cannot drift from the real thing.
The first part checks the adapter rules (`crdt.store.StorageAdapter`); the
second runs `DocStore` — the layout, compaction, archive, encryption — over
each adapter, since the meaning must not depend on which one holds the bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from crdt import (
    DocStore,
    LocalError,
    MemoryAdapter,
    Replica,
    SqliteAdapter,
    StorageAdapter,
    StorageKey,
    StoreError,
    add_event,
    new_session_doc,
    open_doc_store,
    read_session,
)


@dataclass
class Medium:
    """Where an adapter's bytes live; `open()` is a new adapter on the same bytes (a restart)."""

    name: str
    open: Callable[[], StorageAdapter]
    blocking: bool


@pytest.fixture(params=["memory", "sqlite"])
def medium(request: pytest.FixtureRequest, tmp_path: Path) -> Medium:
    if request.param == "memory":
        disk: dict[StorageKey, bytes] = {}
        return Medium("memory", lambda: MemoryAdapter(disk), blocking=False)
    path = tmp_path / "store.db"
    return Medium("sqlite", lambda: SqliteAdapter(path), blocking=True)


# --- the adapter rules ---------------------------------------------------------------


def test_a_saved_value_loads_back_and_a_missing_key_is_none(medium: Medium) -> None:
    a = medium.open()
    assert a.blocking is medium.blocking
    assert a.load(("x",)) is None
    a.save_batch([(("x",), b"one"), (("y", "z"), b"\x00\xff" * 1000), (("e",), b"")])
    assert a.load(("x",)) == b"one"
    assert a.load(("y", "z")) == b"\x00\xff" * 1000
    assert a.load(("e",)) == b""
    assert a.load(("y",)) is None  # a prefix is not an entry (rule 4)
    a.save_batch([(("x",), b"two")])
    assert a.load(("x",)) == b"two"
    assert isinstance(a.load(("x",)), bytes)
    a.close()


def test_load_range_is_every_key_under_the_prefix_sorted(medium: Medium) -> None:
    a = medium.open()
    entries = {("doc", "a"): b"1", ("doc", "a", "c", "2"): b"3", ("doc", "a", "c", "1"): b"2", ("doc", "a-b"): b"4",
               ("doc", "ab", "c"): b"5", ("docs",): b"6", ("meta", "k"): b"7"}  # fmt: skip
    a.save_batch(list(entries.items()))
    assert a.load_range(("doc", "a")) == [
        (("doc", "a"), b"1"), (("doc", "a", "c", "1"), b"2"), (("doc", "a", "c", "2"), b"3"),
    ]  # fmt: skip
    assert a.load_range(("doc", "a", "c")) == [(("doc", "a", "c", "1"), b"2"), (("doc", "a", "c", "2"), b"3")]
    assert [k for k, _ in a.load_range(("doc",))] == sorted(k for k in entries if k[0] == "doc")
    assert a.load_range(()) == sorted(entries.items())
    assert a.load_range(("nothing",)) == []
    for key, _ in a.load_range(()):
        assert isinstance(key, tuple) and all(isinstance(p, str) for p in key)
    a.close()


def test_a_batch_removes_then_puts(medium: Medium) -> None:
    a = medium.open()
    a.save_batch([(("k", "1"), b"a"), (("k", "2"), b"b"), (("k", "3"), b"c")])
    a.save_batch([(("k", "3"), b"C"), (("k", "4"), b"d")], [("k", "1"), ("k", "3"), ("k", "missing")])
    assert a.load_range(("k",)) == [(("k", "2"), b"b"), (("k", "3"), b"C"), (("k", "4"), b"d")]
    a.close()


@pytest.mark.parametrize("bad", [(), ("",), ("a/b",), ("a", ""), ("a", 1), ["a"]])
def test_a_bad_key_is_refused_and_the_batch_changes_nothing(medium: Medium, bad: object) -> None:
    a = medium.open()
    a.save_batch([(("keep",), b"1")])
    with pytest.raises(LocalError):
        a.save_batch([(("new",), b"2"), (bad, b"3")], [("keep",)])  # type: ignore[list-item]
    with pytest.raises(LocalError):
        a.save_batch([(("new",), b"2")], [bad])  # type: ignore[list-item]
    with pytest.raises(LocalError):
        a.load(bad)  # type: ignore[arg-type]
    assert a.load_range(()) == [(("keep",), b"1")]
    a.close()


def test_what_was_saved_is_there_after_a_restart_and_nothing_else(medium: Medium) -> None:
    a = medium.open()
    a.save_batch([(("a",), b"1"), (("b", "c"), b"2")])
    a.save_batch([(("d",), b"3")], [("a",)])
    a.close()
    b = medium.open()
    assert b.load_range(()) == [(("b", "c"), b"2"), (("d",), b"3")]
    b.close()


def test_a_closed_adapter_refuses_every_call(medium: Medium) -> None:
    a = medium.open()
    a.close()
    with pytest.raises(LocalError):
        a.load(("x",))
    with pytest.raises(LocalError):
        a.load_range(())
    with pytest.raises(LocalError):
        a.save_batch([(("x",), b"1")])
    a.close()  # closing twice is harmless


# --- DocStore over each adapter ------------------------------------------------------


def session(session_id: str):
    return new_session_doc(session_id, site="x", charger="c", connector=1, id_token="t", tariff={}, created_by="n")


@pytest.mark.parametrize("key", [None, os.urandom(32)], ids=["plain", "encrypted"])
async def test_documents_survive_a_restart_compaction_and_archive(medium: Medium, key: bytes | None, signer) -> None:
    replica = Replica()
    ids = ["s/1", "s 2", "%3", "site-config"]  # ids that are not plain key parts
    async with open_doc_store(adapter=medium.open(), key=key) as store:
        assert store.blocking is medium.blocking
        for n, doc_id in enumerate(ids):
            await store.write(doc_id, replica.add(doc_id, session(doc_id)))
            for i in range(3):
                heads = replica.docs[doc_id].get_heads()
                add_event(replica.docs[doc_id], signer.sign("meter", doc_id, i + 1, meter_wh=100 * n + i))
                await store.write(doc_id, replica.changes_since(doc_id, heads))
        await store.write(ids[0], replica.changes_since(ids[0], []))  # the same changes again: stored once
        assert store.sync.change_count(ids[0]) == 4
        await store.compact(ids[0], replica.docs[ids[0]])
        assert store.sync.change_count(ids[0]) == 0
        heads = replica.docs[ids[0]].get_heads()
        add_event(replica.docs[ids[0]], signer.sign("stop", ids[0], 4, meter_wh=999))
        await store.write(ids[0], replica.changes_since(ids[0], heads))
        assert store.sync.change_count(ids[0]) == 1
        await store.compact(ids[1], replica.docs[ids[1]], archive=True)
        store.sync.set_meta("incarnation", b"\x00\x05")
    store = DocStore(adapter=medium.open(), key=key)
    try:
        assert store.doc_ids() == sorted(ids)
        assert store.archived_ids() == [ids[1]]
        docs = store.load_all()
        assert sorted(docs) == sorted(set(ids) - {ids[1]})
        assert sorted(store.load_all(include_archived=True)) == sorted(ids)
        for doc_id, doc in store.load_all(include_archived=True).items():
            assert doc.get_heads() == replica.docs[doc_id].get_heads()
        assert read_session(docs[ids[0]]).events.keys() == read_session(replica.docs[ids[0]]).events.keys()
        assert store.load(ids[1]).get_heads() == replica.docs[ids[1]].get_heads()
        assert store.load("absent") is None
        assert store.get_meta("incarnation") == b"\x00\x05"
        assert store.get_meta("absent") is None
    finally:
        store.close()


async def test_unarchiving_compaction_clears_the_archive_flag(medium: Medium) -> None:
    replica = Replica()
    async with open_doc_store(adapter=medium.open()) as store:
        await store.write("s", replica.add("s", session("s")))
        await store.compact("s", replica.docs["s"], archive=True)
        assert store.sync.archived_ids() == ["s"]
        await store.compact("s", replica.docs["s"])
        assert store.sync.archived_ids() == []
        assert list(await store.load_all()) == ["s"]


def test_a_store_refuses_a_wrong_or_missing_key(medium: Medium) -> None:
    DocStore(adapter=medium.open(), key=os.urandom(32)).close()
    with pytest.raises(StoreError, match="wrong store key"):
        DocStore(adapter=medium.open(), key=os.urandom(32))
    with pytest.raises(StoreError, match="is encrypted"):
        DocStore(adapter=medium.open())


def test_an_encrypted_store_holds_no_document_id_or_content_in_clear(medium: Medium, signer) -> None:
    key = os.urandom(32)
    replica = Replica()
    store = DocStore(adapter=medium.open(), key=key)
    doc_id = "session-7f3a9c"
    store.write_batch([(doc_id, replica.add(doc_id, session(doc_id)))])
    store.close()
    raw = medium.open()
    for k, v in raw.load_range(()):
        assert doc_id not in "/".join(k)
        assert doc_id.encode() not in v and b"charger" not in v
    raw.close()


async def test_writes_to_an_adapter_that_does_not_block_take_no_virtual_time(medium: Medium, autojump_clock) -> None:
    # A blocking adapter runs in a worker thread (virtual time may jump meanwhile);
    # one that does not block is called inline, so virtual time stands still.
    replica = Replica()
    async with open_doc_store(adapter=medium.open(), inline=None if not medium.blocking else True) as store:
        before = trio.current_time()
        await store.write("s", replica.add("s", session("s")))
        await store.compact("s", replica.docs["s"])
        assert list(await store.load_all()) == ["s"]
        assert trio.current_time() == before
