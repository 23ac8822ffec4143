"""`crdt.Documents`: a dict of Automerge documents that keeps only the recently used loaded.

What it promises: reading any document gives its current content (changes made to a loaded
one survive its unloading), at most `capacity` are loaded unless pinned or referenced
elsewhere, and ids, `in`, `len`, `heads` and `saved` load nothing.
"""

from __future__ import annotations

import gc

import pytest
import trio
import trio.testing
from automerge.core import ROOT, Document, ScalarType, extract

from crdt import DocStore, Documents, DocumentError, MemoryAdapter, Replica


def doc_with(value: int, key: str = "x") -> Document:
    doc = Document()
    with doc.transaction() as tx:
        tx.put(ROOT, key, ScalarType.Int, value)
    return doc


def held_as_bytes(n: int, capacity: int = 2) -> Documents:
    docs = Documents(capacity=capacity)
    for i in range(n):
        docs.put_saved(f"d{i}", doc_with(i).save())
    return docs


def test_reading_loads_and_only_the_most_recently_used_stay_loaded() -> None:
    docs = held_as_bytes(5)
    assert docs.loaded == 0 and len(docs) == 5 and list(docs) == [f"d{i}" for i in range(5)]
    for i in range(5):
        assert extract(docs[f"d{i}"])["x"] == i
    assert docs.loads == 5 and docs.loaded == 2
    assert [d for d in docs if docs.is_loaded(d)] == ["d3", "d4"]
    docs["d0"]  # noqa: B018 - reading d0 makes it the most recent; d3 goes
    assert [d for d in docs if docs.is_loaded(d)] == ["d0", "d4"]
    d1 = docs.get("d1")  # get() loads, and makes it the most recent, as [] does
    assert d1 is not None and extract(d1)["x"] == 1
    assert [d for d in docs if docs.is_loaded(d)] == ["d0", "d1"]
    assert docs.get("d0") is docs["d0"]
    default = Document()
    assert docs.get("nope") is None and docs.get("nope", default) is default


def test_ids_membership_heads_and_saved_bytes_load_nothing() -> None:
    originals = {f"d{i}": doc_with(i) for i in range(4)}
    docs = Documents(capacity=2)
    for d, doc in originals.items():
        docs.put_saved(d, doc.save())
    for d in originals:
        docs[d]  # noqa: B018 - each loaded once: their heads are known from then on
    loads = docs.loads
    assert "d0" in docs and "zz" not in docs and len(docs) == 4 and sorted(docs) == sorted(originals)
    for d, doc in originals.items():
        assert docs.heads(d) == doc.get_heads()
        assert docs.held_bytes(d) == doc.save()
    assert docs.loads == loads


def test_a_change_to_a_loaded_document_survives_its_unloading() -> None:
    docs = held_as_bytes(3)
    d0 = docs["d0"]
    with d0.transaction() as tx:
        tx.put(ROOT, "y", ScalarType.Int, 42)
    heads = d0.get_heads()
    del d0
    for d in ("d1", "d2"):
        docs[d]  # noqa: B018 - push d0 out
    assert not docs.is_loaded("d0")
    assert docs.heads("d0") == heads  # known without loading
    assert extract(docs["d0"]) == {"x": 0, "y": 42}


def test_an_unchanged_document_keeps_its_bytes_and_a_changed_one_is_saved() -> None:
    docs = held_as_bytes(3, capacity=1)
    before = docs.held_bytes("d0")
    docs["d0"]  # noqa: B018
    docs["d1"]  # noqa: B018 - d0 unloaded: unchanged, held as the very same bytes
    assert not docs.is_loaded("d0") and docs.held_bytes("d0") is before
    d1 = docs["d1"]
    with d1.transaction() as tx:
        tx.put(ROOT, "x", ScalarType.Int, 7)
    del d1
    docs["d2"]  # noqa: B018 - d1 unloaded, saved with its change
    held = docs.held_bytes("d1")
    assert held is not None and extract(Document.load(held))["x"] == 7
    docs["new"] = doc_with(5)
    assert docs.held_bytes("new") is None  # only loaded so far


def test_a_document_referenced_elsewhere_stays_loaded_and_its_changes_count() -> None:
    """A caller that holds a document across an await must never be left changing a copy."""
    docs = held_as_bytes(4, capacity=1)
    kept = docs["d0"]
    for d in ("d1", "d2", "d3"):
        docs[d]  # noqa: B018
    assert docs.is_loaded("d0")  # past capacity, because `kept` refers to it
    with kept.transaction() as tx:
        tx.put(ROOT, "x", ScalarType.Int, 100)
    assert docs["d0"] is kept
    del kept
    gc.collect()
    for d in ("d1", "d2"):
        docs[d]  # noqa: B018 - now it may go
    assert not docs.is_loaded("d0")
    assert extract(docs["d0"])["x"] == 100


async def test_a_document_held_by_a_task_across_an_await_is_not_unloaded() -> None:
    docs = held_as_bytes(6, capacity=1)

    async def writer(done: trio.Event) -> None:
        doc = docs["d0"]
        await done.wait()  # others read every document meanwhile
        with doc.transaction() as tx:
            tx.put(ROOT, "late", ScalarType.Int, 1)

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, done)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(1, 6):
            docs[f"d{i}"]  # noqa: B018
        done.set()
    for i in range(1, 6):
        docs[f"d{i}"]  # noqa: B018
    assert extract(docs["d0"]) == {"x": 0, "late": 1}


def test_pinned_documents_stay_loaded() -> None:
    docs = Documents(capacity=1, pinned=("site-config",))
    docs["site-config"] = doc_with(1)
    for i in range(3):
        docs[f"s{i}"] = doc_with(i)
    assert docs.is_loaded("site-config") and docs.loaded == 2


def test_the_mapping_as_a_replica_uses_it() -> None:
    """A `Replica` on `Documents` syncs as on a dict: a peer gets every document, whichever is loaded."""
    mine, theirs = Replica(), Replica()
    mine.docs = held_as_bytes(6, capacity=2)  # type: ignore[assignment]
    for _ in range(10):
        for d in sorted(mine.docs):
            msg = mine.generate("b", d)
            if msg is not None:
                theirs.receive("a", d, msg)
            back = theirs.generate("a", d)
            if back is not None:
                mine.receive("b", d, back)
    assert sorted(theirs.docs) == sorted(mine.docs)
    for d in mine.docs:
        assert theirs.docs[d].get_heads() == mine.docs[d].get_heads()
    assert mine.heads_hashes() == theirs.heads_hashes()
    assert mine.docs.loaded <= 2  # type: ignore[attr-defined]
    del mine.docs["d0"]
    assert "d0" not in mine.docs and len(mine.docs) == 5
    mine.docs.clear()
    assert len(mine.docs) == 0


def test_bytes_that_do_not_load_name_the_document() -> None:
    docs = Documents()
    docs.put_saved("s/1", b"not automerge")
    assert "s/1" in docs
    with pytest.raises(DocumentError, match="stored document 's/1' does not load"):
        docs["s/1"]  # noqa: B018
    with pytest.raises(KeyError):
        docs["nope"]  # noqa: B018
    with pytest.raises(KeyError):
        docs.heads("nope")


def test_the_store_hands_its_documents_over_as_bytes() -> None:
    store = DocStore(adapter=MemoryAdapter({}))
    a, b = doc_with(1), doc_with(2)
    store.write_batch([("a", [(c.hash, c.bytes) for c in a.get_changes([])])])
    store.write_batch([("b", [(c.hash, c.bytes) for c in b.get_changes([])])])
    store.compact("b", b, archive=True)
    assert sorted(store.load_all_bytes()) == ["a"]
    saved = store.load_all_bytes(include_archived=True)
    assert sorted(saved) == ["a", "b"]
    docs = Documents()
    for d, data in saved.items():
        docs.put_saved(d, data)
    assert docs.heads("a") == a.get_heads() and docs.heads("b") == b.get_heads()
    assert {d: doc.get_heads() for d, doc in store.load_all(include_archived=True).items()} == {
        "a": a.get_heads(),
        "b": b.get_heads(),
    }
