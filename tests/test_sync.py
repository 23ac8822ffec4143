"""Sync bookkeeping: digests find differing documents; bad sync messages change nothing."""

from __future__ import annotations

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
